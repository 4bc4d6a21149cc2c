# vmtrim appliance: the shell every variant's /init (init.sh, sparsify.sh) shares. The
# build packs it as /lib/vmtrim/guestlib.sh; an /init sources it first:
#   . /lib/vmtrim/guestlib.sh
# Sourcing it sets PATH, mounts /dev, /proc and /sys and sends the shell's input and
# output to the console; then it defines the control-port functions (say, die, wait_host:
# the port opens as fd 3 once the /init sets CTL) and the disk's counters (DISK).

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys

CTL=
say() {
    echo "VMTRIM $*"
    if [ -n "$CTL" ]; then echo "VMTRIM $*" >&3; fi
}
halt_now() {
    sync
    poweroff -f
    while :; do sleep 1; done # PID 1 must never exit: that is a kernel panic
}
die() {
    say "step=error message=$*"
    halt_now
}
wait_host() {
    # EOF: the host went away (vmtrim was killed). Stop cleanly: QEMU then flushes.
    read -r _reply <&3 || die "the host closed the control port"
}
find_port() { # print /dev/vportNpM for a virtio-serial port name
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

DISK=
wait_disk() { # set DISK to the disk (vda or sda) once it appears, or die after 60 s
    i=0
    while [ -z "$DISK" ]; do
        for d in vda sda; do [ -b "/dev/$d" ] && DISK=$d; done
        [ -n "$DISK" ] && break
        i=$((i + 1))
        [ $i -gt 600 ] && die "no disk appeared (vda or sda)"
        sleep 0.1
    done
}
discarded() { # bytes of discard requests the disk has completed (field 14: sectors)
    set -- $(cat "/sys/block/$DISK/stat")
    echo $((${14:-0} * 512))
}
settle() { # sync until no request is in flight and the discard counter stops moving
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
