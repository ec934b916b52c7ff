#!/nmi/busybox sh
# PID 1 of the VM that `cargo xtask vm` boots (xtask/src/vm.rs). It sets up what a systemd host provides and the
# tests rely on (proc, sys, dev, tmpfs /tmp and /run, cgroup v2, bpffs, module autoloading), runs the test binary
# with the environment in /nmi/env and the arguments in /nmi/test-args, prints `nmi-vm: exit <code>` for xtask, and
# powers off. Only busybox applets are called here; `ip`, `nft` and `ss` are the host's, found on PATH by the tests.

/nmi/busybox mkdir -p /nmi/applets
/nmi/busybox --install -s /nmi/applets
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/nmi/applets
export HOME=/root

finish() {
    echo "nmi-vm: exit $1"
    sync
    poweroff -f
}

setup() {
    mkdir -p /proc /sys /dev /tmp /run /root &&
        mount -t proc proc /proc &&
        mount -t sysfs sysfs /sys &&
        mount -t devtmpfs devtmpfs /dev &&
        mount -t tmpfs -o mode=1777 tmpfs /tmp &&
        mount -t tmpfs -o mode=755 tmpfs /run &&
        mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
        mount -t bpf bpf /sys/fs/bpf &&
        # The kernel runs this for `nft-expr-*`, `rtnl-link-veth`, ...; busybox resolves them via modules.alias.
        echo /nmi/applets/modprobe >/proc/sys/kernel/modprobe &&
        hostname nmi-vm &&
        ip link set lo up
}

if ! setup; then
    echo "nmi-vm: setting up the guest failed (see the message above)"
    finish 125
fi

. /nmi/env
echo "nmi-vm: Linux $(uname -r) up after $(cut -d' ' -f1 /proc/uptime)s; running $(cat /nmi/test-args | tr '\n' ' ')"
# One argument per line, spaces kept.
IFS='
'
set -- $(cat /nmi/test-args)
unset IFS
cd /tmp && /nmi/bin/datapath "$@"
code=$?
echo "nmi-vm: tests done at $(cut -d' ' -f1 /proc/uptime)s of uptime"
finish "$code"
