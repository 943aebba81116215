#!/bin/busybox sh
# crashlab initramfs /init: load the guest's modules, mount the read-only root disk (the virtio
# disk whose serial is crashlab-root) and hand over to the guest init. No udev: the devices are
# fixed and found through /sys. On any failure it says why on the console and reboots, which
# ends QEMU (started with -no-reboot), so the host never waits on a guest that cannot start.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "crashlab-initramfs: $*" >/dev/console
    reboot -f
    sleep 3600
}

mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
while read -r m; do
    insmod "$m" || fail "insmod $m failed"
done </modules.load

root=""
n=0
while [ -z "$root" ]; do
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = crashlab-root ] && root=/dev/${b##*/}
    done
    [ -n "$root" ] && break
    n=$((n + 1))
    [ "$n" -gt 500 ] && fail "no virtio disk with serial crashlab-root after 10 s: $(ls /sys/block)"
    usleep 20000
done
mount -t ext4 -o ro "$root" /newroot || fail "cannot mount $root read-only"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /usr/bin/python3 -u -B /opt/crashlab/vm/guest_init.py
