#!/usr/bin/env bash
# Installs the .deb into a fresh, minimal Debian 12 (mmdebstrap --variant=apt,
# nothing else) with `apt install ./nemofs_*.deb`, then mounts, reads and
# unmounts tests/data/tiny_gpt.nemo there. Shows that the package's Depends are
# complete on a machine that never built nemofs. Not a ctest: it downloads
# about 60 MB from Debian's archive and takes a minute or two.
# Needs root, mmdebstrap (apt-get install mmdebstrap), /dev/fuse, and a build
# (scripts/build.sh). Usage: scripts/package/fresh_debian_install.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
src=$PWD
build=$(cd "${1:-build}" && pwd)
command -v mmdebstrap >/dev/null || { echo "needs mmdebstrap: apt-get install mmdebstrap" >&2; exit 2; }

work=$(mktemp -d /tmp/nemofs-fresh-debian.XXXXXX)
root="$work/root"
mounted=()
cleanup() {
  set +e
  if mountpoint -q "$root/mnt/ckpt" 2>/dev/null; then
    pid=$(getfattr -n user.nemofs.pid --only-values "$root/mnt/ckpt" 2>/dev/null)
    fusermount3 -u "$root/mnt/ckpt" || fusermount3 -uz "$root/mnt/ckpt"
    [[ -n $pid ]] && kill "$pid" 2>/dev/null
  fi
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}"; done
  # Never delete through a mount that is still there (a bind of /dev).
  if grep -q " $work" /proc/mounts; then
    echo "left $work in place: something is still mounted under it" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

(cd "$work" && cpack -G DEB -B "$work/out" --config "$build/CPackConfig.cmake" >/dev/null)
deb=$(ls "$work"/out/nemofs_*.deb)
echo "== $(basename "$deb") into a fresh Debian 12"
mmdebstrap --quiet --variant=apt bookworm "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$src/tests/data/tiny_gpt.nemo" "$root/root/"
for m in dev proc sys; do
  if [[ $m == dev ]]; then mount --bind /dev "$root/dev"; else mount -t "${m/sys/sysfs}" "$m" "$root/$m"; fi
  mounted+=("$root/$m")
done
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
in_root apt-get update -qq
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "/root/$(basename "$deb")"
echo "== installed:"
in_root dpkg -L nemofs | grep -E 'bin/|man1/|completions/'
in_root nemofs --version | head -n1
mkdir -p "$root/mnt/ckpt"
in_root nemofs mount /root/tiny_gpt.nemo /mnt/ckpt
in_root ls /mnt/ckpt
cmp <(in_root cat /mnt/ckpt/config.yaml) <(in_root nemofs cat /root/tiny_gpt.nemo config.yaml)
in_root nemofs umount /mnt/ckpt
echo "== ok: apt install, mount, read, umount on a fresh Debian 12"
