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

# The prelude (PATH, /dev, /proc, /sys, the console) and say, die, wait_host, wait_port,
# wait_disk, discarded and settle: shared with the other variants.
. /lib/vmtrim/guestlib.sh

MODE=online FS=ext4 SIZE=200 AGENT=0
for word in $(cat /proc/cmdline); do
    case "$word" in
    vmtrim.mode=*) MODE=${word#*=} ;;
    vmtrim.fs=*) FS=${word#*=} ;;
    vmtrim.size=*) SIZE=${word#*=} ;;
    vmtrim.agent=*) AGENT=${word#*=} ;;
    esac
done

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

wait_disk

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
