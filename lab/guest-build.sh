#!/bin/sh
# Build an OpenZFS lab guest from Debian's package registries alone: a Debian release with
# its stock kernel, zfs-dkms compiled for that kernel inside the chroot, openssh-server,
# mbuffer, and what zettabee needs to run there as a backup host runs it (python3 with
# Debian's nagiosplugin and paramiko, nsca and send_nsca), on an ext4 disk image made by
# `mkfs.ext4 -d` (no loop device needed).
#
# Usage (root): lab/guest-build.sh OUTDIR [SUITE]
#   SUITE is bookworm (Debian 12, OpenZFS 2.1; the default) or trixie (Debian 13,
#   OpenZFS 2.3), each from its own contrib component.
#   OUTDIR receives rootfs.img, vmlinuz, initrd.img, the client key pair
#   (client_ed25519), the guest's host public key (host_ed25519.pub) and meta.json.
#
# `python -m lab.guest build` calls this and caches OUTDIR under a hash of this file and
# SUITE, so editing the recipe is what makes the next run rebuild.
set -eu

out=$1
mirror=${ZETTABEE_GUEST_MIRROR:-http://deb.debian.org/debian}
security=${ZETTABEE_GUEST_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=${2:-bookworm}
case $suite in
    bookworm | trixie) ;;
    *) echo "guest-build: unknown suite $suite (bookworm or trixie)" >&2; exit 2 ;;
esac

# The chroot's mounts (proc, sys, dev) live in a mount namespace of their own: they vanish
# with this script however it ends, and never leak into the host's mount table. It is a
# slave, not private: a private one keeps its copy of every file system another lab mounted
# under its (shared) zfs-fuse pool mount, so zfs-fuse calls it busy and the other lab cannot
# destroy it for the build's 5-8 minutes; a slave follows the host's mounts and unmounts
# there, and still sends none of its own back. (Pool mounts themselves sit on a private
# parent here, so their copies stay; lab.hosts.release_foreign_mounts detaches those.)
if [ -z "${ZETTABEE_GUEST_UNSHARED:-}" ]; then
    ZETTABEE_GUEST_UNSHARED=1 exec unshare --mount --propagation slave -- "$0" "$@"
fi

started=$(date +%s)
mkdir -p "$out"
root=$out/root
rm -rf "$root"
mkdir -p "$root"

step() { echo "guest-build: $*"; }

in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

apt_install() {
    in_root apt-get -y -q -o Dpkg::Options::=--force-confold --no-install-recommends install "$@"
}

step "debootstrap $suite (minbase, main and contrib)"
debootstrap --variant=minbase --components=main,contrib \
    --include=systemd-sysv,udev,kmod,iproute2,procps \
    "$suite" "$root" "$mirror"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"

# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

# The security suite comes before the kernel: the kernel installed is then the newest one,
# and dkms compiles zfs once, for it.
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main contrib
deb $mirror $suite-updates main contrib
deb $security $suite-security main contrib
EOF
step "upgrade to $suite-security and $suite-updates"
in_root apt-get -q update
in_root apt-get -y -q -o Dpkg::Options::=--force-confold dist-upgrade

# A small initramfs: only what a QEMU guest needs to find its root disk.
apt_install initramfs-tools
echo MODULES=list >"$root/etc/initramfs-tools/conf.d/zettabee"
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' >>"$root/etc/initramfs-tools/modules"

step "kernel and headers"
apt_install linux-image-amd64 linux-headers-amd64
kernel=$(ls "$root/lib/modules" | sort -V | tail -n 1)

step "zfs-dkms (compiled for $kernel), zfsutils-linux, openssh-server, mbuffer"
apt_install zfs-dkms zfsutils-linux openssh-server openssh-client mbuffer
step "python3 with nagiosplugin and paramiko, nsca and send_nsca: zettabee's own needs"
apt_install python3 python3-venv python3-nagiosplugin python3-paramiko nsca nsca-client
if ! ls "$root/lib/modules/$kernel/updates/dkms/" 2>/dev/null | grep -q '^zfs\.ko'; then
    echo "guest-build: dkms built no zfs module for $kernel" >&2
    ls -R "$root/var/lib/dkms" >&2 || true
    exit 1
fi
zfs_version=$(in_root dpkg-query -W -f '${Version}' zfsutils-linux)

step "configure the guest"
echo zbguest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 zbguest\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw,noatime 0 1\n' >"$root/etc/fstab"
# A fixed address; lab/guest.py puts the gateway on the tap device the guest is attached
# to and forwards only the SSH port in. No DHCP wait, no route out.
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-qemu.network" <<EOF
[Match]
Name=eth0

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
EOF
in_root systemctl enable systemd-networkd.service
in_root systemctl mask systemd-networkd-wait-online.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer getty@tty1.service nsca.service
echo zfs >"$root/etc/modules-load.d/zfs.conf"

# SSH: one ed25519 host key made here and pinned by the lab, root by key only, a plain
# /bin/sh login shell and no environment passed in, so every command starts clean.
rm -f "$root"/etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -C zbguest -f "$root/etc/ssh/ssh_host_ed25519_key"
cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$out/host_ed25519.pub"
rm -f "$out/client_ed25519" "$out/client_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C zettabee-lab-guest-client -f "$out/client_ed25519"
mkdir -p "$root/root/.ssh"
chmod 700 "$root/root/.ssh"
cp "$out/client_ed25519.pub" "$root/root/.ssh/authorized_keys"
cat >"$root/etc/ssh/sshd_config" <<EOF
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
PermitUserEnvironment no
MaxSessions 100
MaxStartups 100:30:200
ClientAliveInterval 15
Subsystem sftp internal-sftp
EOF
in_root usermod -s /bin/sh root
: >"$root/etc/motd"

step "trim: package cache and dkms build tree"
in_root apt-get clean
rm -rf "$root"/var/lib/dkms/zfs/*/build "$root"/var/lib/apt/lists/* "$root/usr/sbin/policy-rc.d"

cp "$root/boot/vmlinuz-$kernel" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kernel" "$out/initrd.img"
umount "$root/tmp" "$root/dev" "$root/sys" "$root/proc"

step "disk image (mkfs.ext4 -d)"
used_mb=$(du -sm "$root" | cut -f1)
rm -f "$out/rootfs.img"
mkfs.ext4 -q -F -L zbroot -E root_owner=0:0 -d "$root" "$out/rootfs.img" "$((used_mb + 1024))M"
rm -rf "$root"

finished=$(date +%s)
cat >"$out/meta.json" <<EOF
{"kernel": "$kernel", "zfs": "$zfs_version", "suite": "$suite", "build_seconds": $((finished - started))}
EOF
step "done in $((finished - started)) s: kernel $kernel, zfs $zfs_version"
