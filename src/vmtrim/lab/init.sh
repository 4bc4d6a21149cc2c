#!/bin/sh
# vmtrim lab guest: PID 1 of the throwaway VM that `vmtrim verify` boots.
#
# The scenario comes from the kernel command line:
#   vmtrim.mode=online|fstrim|agent|probe  vmtrim.fs=ext4|ext3|xfs|btrfs
#   vmtrim.size=MiB  vmtrim.agent=0|1
#
# Each step is one line "VMTRIM step=NAME key=value ..." on the serial console (the
# log) and on the virtio-serial port named org.vmtrim.ctl (the host reads it there,
# free of interleaved kernel messages). Where the host must measure, the guest waits
# for one line ("go") from that port. An error line ends with message=<free text>.
# The disk is the only block device; the filesystem is on the whole disk.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

MODE=online FS=ext4 SIZE=200 AGENT=0
for word in $(cat /proc/cmdline); do
    case "$word" in
    vmtrim.mode=*) MODE=${word#*=} ;;
    vmtrim.fs=*) FS=${word#*=} ;;
    vmtrim.size=*) SIZE=${word#*=} ;;
    vmtrim.agent=*) AGENT=${word#*=} ;;
    esac
done

CTL=
say() {
    echo "VMTRIM $*"
    if [ -n "$CTL" ]; then echo "VMTRIM $*" >&3; fi
}
halt_now() {
    sync
    poweroff -f
    while :; do sleep 1; done  # PID 1 must never exit: that is a kernel panic
}
die() {
    say "step=error message=$*"
    halt_now
}
wait_host() {
    read -r _reply <&3 || die "the host closed the control port"
}
find_port() {  # print /dev/vportNpM for a virtio-serial port name
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] || continue
        if [ "$(cat "$f")" = "$1" ]; then
            d=${f%/name}
            [ -c "/dev/${d##*/}" ] && echo "/dev/${d##*/}" && return 0
        fi
    done
    return 1
}
wait_port() {
    i=0
    until find_port "$1"; do
        i=$((i + 1))
        [ $i -gt 300 ] && return 1
        sleep 0.1
    done
}

while read -r group m; do
    case "$group" in
    base | "$FS") insmod "/lib/modules/$m" 2>/dev/null || echo "VMTRIM step=warn module=$m" ;;
    esac
done </etc/vmtrim/modules
say "step=boot kernel=$(uname -r)"

if [ "$MODE" = probe ]; then
    say "step=ready kernel=$(uname -r)"
    halt_now
fi

CTL=$(wait_port org.vmtrim.ctl) || die "no virtio-serial port org.vmtrim.ctl"
exec 3<>"$CTL"

if [ "$AGENT" = 1 ]; then
    GA=$(wait_port org.qemu.guest_agent.0) || die "no virtio-serial port org.qemu.guest_agent.0"
    # qemu-ga's guest-shutdown runs /sbin/shutdown, which busybox lacks: power off instead
    # (vmtrim fix --restart shuts a guest down through its agent).
    mkdir -p /sbin
    printf '#!/bin/sh\nsync\nexec poweroff -f\n' >/sbin/shutdown && chmod 755 /sbin/shutdown
    qemu-ga -m virtio-serial -p "$GA" -d || die "qemu-ga did not start"
fi

DISK=
i=0
while [ -z "$DISK" ]; do
    for d in vda sda; do [ -b "/dev/$d" ] && DISK=$d; done
    [ -n "$DISK" ] && break
    i=$((i + 1))
    [ $i -gt 600 ] && die "no disk appeared (vda or sda)"
    sleep 0.1
done

discarded() {  # bytes of discard requests the disk has completed (field 14: sectors)
    set -- $(cat "/sys/block/$DISK/stat")
    echo $((${14:-0} * 512))
}
settle() {  # sync until no request is in flight and the discard counter stops moving
    prev=-1
    n=0
    while :; do
        sync
        set -- $(cat "/sys/block/$DISK/stat")
        cur=${14:-0}
        [ "$cur" = "$prev" ] && [ "${9:-0}" = 0 ] && break
        prev=$cur
        n=$((n + 1))
        [ $n -gt 60 ] && break
        sleep 0.3
    done
}

OPTS=
case "$MODE" in
online) OPTS=discard ;;
*) [ "$FS" = btrfs ] && OPTS=nodiscard ;;
esac
mount -t "$FS" ${OPTS:+-o "$OPTS"} "/dev/$DISK" /mnt || die "mount -t $FS ${OPTS:+-o $OPTS} /dev/$DISK failed"
say "step=ready kernel=$(uname -r) disk=$DISK fs=$FS mode=$MODE" \
    "discard_max=$(cat "/sys/block/$DISK/queue/discard_max_bytes")"
wait_host

dd if=/dev/urandom of=/mnt/vmtrim.fill bs=1M count="$SIZE" 2>/dev/null || die "writing $SIZE MiB failed"
settle
say "step=written bytes=$(stat -c %s /mnt/vmtrim.fill) discarded=$(discarded)"
wait_host

rm /mnt/vmtrim.fill || die "rm failed"
sync
case "$MODE" in
fstrim)
    out=$(fstrim -v /mnt 2>&1)
    rc=$?
    trimmed=$(echo "$out" | sed -n 's/.*: \([0-9][0-9]*\) bytes.*/\1/p')
    say "step=fstrim rc=$rc trimmed=${trimmed:--1}"
    ;;
agent)
    say "step=deleted"
    wait_host  # the host sends guest-fstrim through the agent, then "go"
    ;;
esac
settle
say "step=trimmed discarded=$(discarded)"
wait_host

umount /mnt || die "umount failed"
say "step=done"
halt_now
