#!/bin/sh
# vmtrim sparsify guest: PID 1 of the appliance variant "sparsify" (vmtrim.lab.build).
#
# It finds every filesystem on the one disk (whole disk, GPT/MBR partitions, LVM
# logical and thin volumes, LUKS volumes when the host has keys) and, per
# vmtrim.action on the kernel command line:
#   trim      mounts each one read-write with safe options, fstrims it, unmounts it;
#             discards a swap area behind its header (signature, UUID, label kept)
#   list      reports what it would do and touches nothing (the disk is read-only)
#   checksum  mounts each one read-only and prints the sha256 of every file
#
# Protocol (as init.sh): "VMTRIM step=NAME key=value ... [message=free text]" lines on
# the virtio-serial port org.vmtrim.ctl; before and after each filesystem's work the
# guest waits for one line from the host, which measures the image then.
#   step=ready disk=vda size=BYTES
#   step=part dev=vda1 start=BYTES size=BYTES          one per partition
#   step=skip dev=D type=T size=BYTES message=REASON   left alone
#   step=fs dev=D type=T size=BYTES uuid=U message=LABEL   (waits)
#   step=trimmed dev=D rc=N trimmed=BYTES discarded=BYTES uuid=U [message=ERROR]   (waits)
#   step=sum dev=D message=SHA256  PATH                (checksum)
#   step=key dev=D uuid=U   (waits: with vmtrim.keys=1 only) the host answers "none", or
#                           "key B64 [B64]": candidate keys, base64, tried in order
#   step=badkey dev=D size=BYTES message=REASON        no candidate opens it
#   step=done
# A key never appears on a command line, the host's or this guest's: it comes over the
# control port and lives in a file in this guest's RAM while cryptsetup reads it.
# Nothing is repaired: a filesystem whose journal or log needs replaying is skipped.

# The prelude (PATH, /dev, /proc, /sys, the console) and say, die, wait_host, wait_port,
# wait_disk, discarded and settle: shared with the lab guest.
. /lib/vmtrim/guestlib.sh

ACTION=trim KEYS=0
for word in $(cat /proc/cmdline); do
    case "$word" in
    vmtrim.action=*) ACTION=${word#*=} ;;
    vmtrim.keys=1) KEYS=1 ;;
    esac
done

LOADED=" "
load_group() { # insmod the modules of one group of /etc/vmtrim/modules, once
    case "$LOADED" in *" $1 "*) return 0 ;; esac
    while read -r group m; do
        [ "$group" = "$1" ] && { insmod "/lib/modules/$m" 2>/dev/null || echo "VMTRIM step=warn module=$m"; }
    done </etc/vmtrim/modules
    LOADED="$LOADED$1 "
}
load_group base

CTL=$(wait_port org.vmtrim.ctl) || die "no virtio-serial port org.vmtrim.ctl"
exec 3<>"$CTL"

wait_disk

bytes_of() { # size in bytes of a block device node (disk, partition or dm device)
    set -- $(stat -L -c '%t %T' "$1")
    echo $(($(cat "/sys/dev/block/$((0x$1)):$((0x$2))/size") * 512))
}
probe() { # TYPE UUID LABEL PTTYPE of a device, from util-linux blkid's low-level probe
    TYPE= UUID= LABEL= PTTYPE=
    blkid -p -o export "$1" >/tmp/probe 2>/dev/null
    while IFS='=' read -r key value; do
        case "$key" in
        TYPE) TYPE=$value ;;
        UUID) UUID=$value ;;
        LABEL) LABEL=$(printf '%s' "$value" | sed 's/\\\(.\)/\1/g') ;; # export escapes spaces
        PTTYPE) PTTYPE=$value ;;
        esac
    done </tmp/probe
}
le_at() { # unsigned little-endian integer of $3 bytes at byte $2 of device $1
    dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null | od -An -tu"$3" | tr -d ' '
}

mkdir -p /etc/lvm /run/lvm /run/cryptsetup /mnt
# thin_check is pdata_tools under another name (it dispatches on argv[0]).
[ -x /usr/sbin/pdata_tools ] && ln -sf pdata_tools /usr/sbin/thin_check
# No udev here: libdevmapper makes the /dev nodes itself. metadata_read_only: repair nothing;
# thin_check without --clear-needs-check-flag only reads the pool's metadata.
cat >/etc/lvm/lvm.conf <<'EOF'
devices { obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 1 monitoring = 0 }
global { metadata_read_only = 1 use_lvmlockd = 0 thin_check_executable = "/usr/sbin/thin_check" thin_check_options = [ "-q" ] }
backup { backup = 0 archive = 0 }
EOF

say "step=ready kernel=$(uname -r) disk=$DISK size=$(bytes_of /dev/$DISK) action=$ACTION"

skip() { # dev type size reason
    say "step=skip dev=$1 type=${2:-unknown} size=$3 message=$4"
}

# Per type: the dirty check, then the mount options that change nothing but free space.
clean_or_reason() { # dev type -> prints a reason when it must be left alone
    case "$2" in
    ext2 | ext3 | ext4)
        incompat=$(le_at "$1" 1120 4)
        [ $((incompat & 4)) -ne 0 ] && echo "the journal needs recovery (the guest was not shut down cleanly): boot it once, or run e2fsck"
        ;;
    xfs)
        state=$(xfs_logprint -t "$1" 2>&1)
        case "$state" in
        *"<CLEAN>"*) ;;
        *"<DIRTY>"*) echo "the log is dirty (the guest was not shut down cleanly): boot it once, or run xfs_repair" ;;
        *) # On the read-only disk of list/checksum it prints nothing; they write nothing.
            [ "$ACTION" = trim ] && echo "xfs_logprint cannot tell whether the log is clean: $(echo "$state" | tail -n1)" ;;
        esac
        ;;
    btrfs)
        [ "$(le_at "$1" $((65536 + 96)) 8)" != 0 ] && echo "a log tree awaits replay (the guest was not shut down cleanly): boot it once"
        [ "$(le_at "$1" $((65536 + 136)) 8)" != 1 ] && echo "a btrfs spanning several devices is left alone"
        ;;
    esac
}
mount_opts() { # type -> mount -t TYPE -o OPTS
    case "$1" in
    ext2 | ext3 | ext4) echo "ext4 noatime,noinit_itable" ;; # no lazy inode-table zeroing
    xfs) echo "xfs noatime,nouuid" ;;
    btrfs) echo "btrfs noatime,nodiscard" ;;
    vfat) echo "vfat noatime" ;;
    ntfs) echo "ntfs3 noatime" ;;
    esac
}

trim_swap() { # dev name size
    page=
    for p in 4096 8192 16384 65536; do
        [ "$(dd if="$1" bs=1 skip=$((p - 10)) count=10 2>/dev/null)" = SWAPSPACE2 ] && page=$p && break
    done
    if [ -z "$page" ]; then
        skip "$2" swap "$3" "no SWAPSPACE2 signature at the end of a 4-64 KiB header page"
        return
    fi
    say "step=fs dev=$2 type=swap size=$3 uuid=$UUID message=$LABEL"
    wait_host
    rc=0
    if [ "$ACTION" = trim ]; then
        before=$(discarded)
        blkdiscard -o "$page" "$1" 2>/tmp/err
        rc=$?
        settle
        trimmed=$(($3 - page))
        [ $rc = 0 ] || trimmed=0
    else
        before=0 trimmed=0
    fi
    probe "$1"
    say "step=trimmed dev=$2 rc=$rc trimmed=$trimmed discarded=$(($(discarded) - before)) uuid=$UUID message=$(cat /tmp/err 2>/dev/null)"
    wait_host
}

trim_fs() { # dev name type size
    set -- "$1" "$2" "$3" "$4" $(mount_opts "$3")
    reason=$(clean_or_reason "$1" "$3" | head -n1)
    if [ -n "$reason" ]; then
        skip "$2" "$3" "$4" "$reason"
        return
    fi
    [ "$3" = vfat ] && load_group vfat
    [ "$3" = xfs ] && load_group xfs
    [ "$3" = btrfs ] && load_group btrfs
    [ "$3" = ntfs ] && load_group ntfs3
    say "step=fs dev=$2 type=$3 size=$4 uuid=$UUID message=$LABEL"
    wait_host
    rc=0 trimmed=0 before=$(discarded)
    : >/tmp/err
    case "$ACTION" in
    trim)
        if mount -t "$5" -o "$6" "$1" /mnt 2>/tmp/err; then
            if [ "$3" = ntfs ] && grep -q " /mnt ntfs3 ro" /proc/mounts; then
                echo "ntfs3 mounted it read-only (dirty or hibernated): left alone" >/tmp/err
                rc=1
            else
                out=$(fstrim -v /mnt 2>/tmp/err)
                rc=$?
                trimmed=$(echo "$out" | sed -n 's/.*: \([0-9][0-9]*\) bytes.*/\1/p')
                if [ "$3" = btrfs ] && [ $rc = 0 ]; then
                    # The mount's own commit frees the old copies of the blocks it rewrote
                    # (copy on write); commit now and trim those too (measured: 640 KB).
                    sync
                    out=$(fstrim -v /mnt 2>/tmp/err)
                    rc=$?
                    more=$(echo "$out" | sed -n 's/.*: \([0-9][0-9]*\) bytes.*/\1/p')
                    trimmed=$((${trimmed:-0} + ${more:-0}))
                fi
            fi
            umount /mnt || die "umount $1 failed"
        else
            rc=32
        fi
        settle
        ;;
    checksum)
        ro=ro
        [ "$3" = xfs ] && ro=ro,norecovery
        if mount -t "$5" -o "$ro" "$1" /mnt 2>/tmp/err; then
            (cd /mnt && find . -type f | sort | while read -r f; do
                say "step=sum dev=$2 message=$(sha256sum "$f")"
            done)
            umount /mnt || die "umount $1 failed"
        else
            rc=32
        fi
        ;;
    esac
    say "step=trimmed dev=$2 rc=$rc trimmed=${trimmed:-0} discarded=$(($(discarded) - before)) uuid=$UUID message=$(head -c 300 /tmp/err | tr '\n' ' ')"
    wait_host
}

CRYPT_OPEN= # the mappings this run opened, newest first
open_luks() { # dev name size: open it with the host's key, then handle what it holds
    load_group dm
    load_group crypt
    say "step=key dev=$2 uuid=$UUID"
    read -r reply <&3 || die "the host closed the control port"
    set -- "$1" "$2" "$3" $reply
    if [ "$4" != key ]; then
        skip "$2" crypto_LUKS "$3" "LUKS is left alone: no --key names it"
        return
    fi
    map=vmtrim-crypt$(($(echo "$CRYPT_OPEN" | wc -w) + 1))
    ro=
    [ "$ACTION" = trim ] || ro=--readonly
    dev=$1 name=$2 size=$3
    shift 4
    rc=2
    umask 077
    for k in "$@"; do
        echo "$k" | base64 -d >/run/key || continue
        # allow-discards: fstrim's discards must pass dm-crypt to reach the image
        cryptsetup open --type luks --key-file /run/key --allow-discards --disable-keyring \
            $ro "$dev" "$map" </dev/null 2>/tmp/err
        rc=$?
        # cryptsetup(8) RETURN CODES: 2 is "no permission (bad passphrase)"; try the next
        [ $rc = 2 ] || break
    done
    rm -f /run/key
    umask 022
    if [ $rc != 0 ]; then
        if [ $rc = 2 ]; then
            say "step=badkey dev=$name size=$size message=the key does not open this LUKS volume"
        else
            skip "$name" crypto_LUKS "$size" "cryptsetup open failed (exit $rc): $(head -c 200 /tmp/err | tr '\n' ' ')"
        fi
        return
    fi
    CRYPT_OPEN="$map $CRYPT_OPEN"
    volume "/dev/mapper/$map" "$name:luks"
}
close_luks() { # close what is no longer in use (a PV inside LUKS waits for vgchange -an)
    left=
    for map in $CRYPT_OPEN; do
        cryptsetup close "$map" 2>/dev/null || left="$left $map"
    done
    CRYPT_OPEN=$left
}

LVM_SEEN=0
volume() { # /dev/path name: one block device that holds a filesystem, swap, PV or nothing
    size=$(bytes_of "$1")
    probe "$1"
    case "$TYPE" in
    ext2 | ext3 | ext4 | xfs | btrfs | vfat) trim_fs "$1" "$2" "$TYPE" "$size" ;;
    ntfs)
        if [ "${NTFS:-0}" = 1 ]; then trim_fs "$1" "$2" ntfs "$size"; else
            skip "$2" ntfs "$size" "NTFS is left alone: the appliance's Debian 12 kernel has no ntfs3 (CONFIG_NTFS3_FS is not set), so its FITRIM is unmeasured"
        fi
        ;;
    swap) trim_swap "$1" "$2" "$size" ;;
    swsuspend) skip "$2" swsuspend "$size" "swap that holds a hibernation image: left alone" ;;
    crypto_LUKS)
        if [ "$KEYS" = 1 ]; then open_luks "$1" "$2" "$size"; else
            skip "$2" crypto_LUKS "$size" "LUKS is left alone: no key given (vmtrim sparsify --key)"
        fi
        ;;
    LVM2_member) LVM_SEEN=1 ;;
    "") skip "$2" "" "$size" "no filesystem found: left alone" ;;
    *) skip "$2" "$TYPE" "$size" "$TYPE is not a filesystem vmtrim trims: left alone" ;;
    esac
}

for v in $(cat /proc/cmdline); do case "$v" in vmtrim.ntfs=1) NTFS=1 ;; esac; done

probe "/dev/$DISK"
if [ -n "$PTTYPE" ] && [ -z "$TYPE" ]; then
    for p in /sys/block/$DISK/$DISK*; do
        [ -r "$p/partition" ] || continue
        name=${p##*/}
        start=$(($(cat "$p/start") * 512))
        size=$(($(cat "$p/size") * 512))
        say "step=part dev=$name start=$start size=$size"
        if [ "$size" -le 1024 ]; then
            skip "$name" extended "$size" "the extended partition's container (its logical partitions are handled)"
        else
            volume "/dev/$name" "$name"
        fi
    done
else
    volume "/dev/$DISK" "$DISK"
fi

if [ "$LVM_SEEN" = 1 ]; then
    load_group dm
    lvm vgchange -ay >/tmp/lvm.log 2>&1 || say "step=warn message=lvm vgchange -ay: $(tail -n1 /tmp/lvm.log)"
    lvm lvs --noheadings --separator ' ' -o vg_name,lv_name,lv_attr,lv_dm_path 2>/dev/null >/tmp/lvs
    while read -r vg lv attr path; do
        case "$attr" in
        t*) skip "$vg/$lv" thin-pool "" "a thin pool: its thin volumes are trimmed, and pass the discards down" ;;
        [-V]???a*) volume "$path" "$vg/$lv" ;;
        *) skip "$vg/$lv" lvm "" "not an active plain or thin volume (attr $attr): left alone" ;;
        esac
    done </tmp/lvs
    close_luks # LUKS inside a logical volume, before the volume goes
    lvm vgchange -an >/dev/null 2>&1
fi
close_luks
[ -z "$CRYPT_OPEN" ] || say "step=warn message=cryptsetup close failed:$CRYPT_OPEN"

settle
say "step=done discarded=$(discarded)"
halt_now
