#!/bin/sh
# vmtrim set-up for a fresh Debian 12 machine, run as root.
#
#   sh bootstrap.sh demo   install everything, then run vmtrim's main job on the built-in lab VM
#   sh bootstrap.sh test   install everything, then run the whole test suite (what CI runs)
#   sh bootstrap.sh install   only install
#
# Installs Debian packages with apt-get, creates .venv/ in this folder with vmtrim
# and its Python dependencies, and the users and groups libvirtd needs.
set -eu
cd "$(dirname "$0")"
HERE=$(pwd)
MODE=${1:-install}

PACKAGES="python3 python3-venv python3-dev gcc pkg-config
  qemu-system-x86 qemu-utils qemu-guest-agent busybox-static kmod cpio
  e2fsprogs xfsprogs btrfs-progs util-linux procps
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev libxml2-utils"
TEST_PACKAGES="prometheus chromium fonts-dejavu-core patch man-db groff-base sqlite3 systemd
  openssh-server openssh-client lvm2 dmsetup gdisk fdisk dosfstools mtools cryptsetup-bin"

install() {
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap.sh: run as root (it installs Debian packages)" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # With recommends: that is how the suite was run and measured (seabios, ipxe and
    # qemu's block modules come either way; libvirt's recommends add xmllint and lvm2).
    # shellcheck disable=SC2086
    apt-get install -y $PACKAGES
    # The tests' real parts beyond QEMU and libvirt: promtool and a Prometheus server
    # for the metrics, headless Chromium for the HTML report. Without recommends: they
    # would pull a desktop (and node-exporter, which wants systemd).
    # Their postinst scripts must not start services (an sshd on port 22, a Prometheus
    # on 9090): the tests start their own on loopback. policy-rc.d is Debian's switch.
    POLICY=/usr/sbin/policy-rc.d
    ours=""
    if [ ! -e "$POLICY" ]; then printf '#!/bin/sh\nexit 101\n' >"$POLICY"; chmod 755 "$POLICY"; ours=1; fi
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $TEST_PACKAGES
    if [ -n "$ours" ]; then rm -f "$POLICY"; fi

    # libvirtd started by hand (no systemd) needs these; see DESIGN.md.
    getent group kvm >/dev/null || groupadd -r kvm
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    mkdir -p /var/log/libvirt /var/lib/libvirt/qemu /var/cache/libvirt /run/libvirt
    # Without udev /dev/kvm stays root 0600. libvirtd then probes QEMU with KVM but checks
    # the cache as libvirt-qemu without it, so it re-probes on every call (virsh version
    # took minutes). Debian's udev rule makes it root:kvm 0660; do the same.
    if [ -c /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi

    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet --upgrade pip
    # libvirt-python must match the libvirt it is built against.
    LIBVIRT_VERSION=$(pkg-config --modversion libvirt)
    .venv/bin/python -m pip install --quiet -e ".[dev,libvirt]" "libvirt-python==${LIBVIRT_VERSION}"
}

case "$MODE" in
install)
    install
    ;;
demo)
    install
    # The main job on the built-in default: boot the lab guest, write and delete
    # 200 MiB, and show the host image shrink.
    exec .venv/bin/vmtrim verify
    ;;
test)
    install
    .venv/bin/ruff check src tests bench ansible
    .venv/bin/ruff format --check src tests bench ansible
    .venv/bin/mypy
    shift
    exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
    ;;
*)
    echo "usage: sh bootstrap.sh [install|demo|test]" >&2
    exit 2
    ;;
esac
