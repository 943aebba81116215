#!/usr/bin/env bash
# Make the offline base image crashlab/base:bookworm-ARCH (ARCH = amd64 | arm64) when no registry
# can be reached: debootstrap a minimal Debian with python3 and sqlite3, then build it FROM scratch.
#
#   docker/make-base.sh ARCH
#
# The rootfs tarball is cached in /var/cache/crashlab/ (CRASHLAB_CACHE), so a rebuild after the
# image is removed takes seconds. The mirror is the one this machine's apt uses (override with
# CRASHLAB_MIRROR). A foreign ARCH needs its qemu binfmt handler (docker/setup-linux.sh).
#
# Why not `docker import`: it records the engine's arch whatever the files are, and
# `docker run --platform linux/arm64` then fails. The legacy builder with --platform records it.
set -euo pipefail

ARCH=${1:-}
case "$ARCH" in
  amd64) qemu_arch=x86_64 ;;
  arm64) qemu_arch=aarch64 ;;
  *) echo "usage: $0 amd64|arm64" >&2; exit 2 ;;
esac

SUITE=bookworm
TAG=crashlab/base:$SUITE-$ARCH
CACHE=${CRASHLAB_CACHE:-/var/cache/crashlab}
TARBALL=$CACHE/rootfs-$SUITE-minbase-python3-sqlite3-$ARCH.tar
START=$SECONDS

say() { echo "make-base $ARCH: $*"; }
die() { echo "make-base $ARCH: error: $*" >&2; exit 1; }
elapsed() { echo "$((SECONDS - ${1:-$START})) s"; }

# --- already there? ---------------------------------------------------------------------------
command -v docker >/dev/null || die "no docker CLI"
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
  || die "the Docker engine does not answer (docker/setup-linux.sh starts it)"
if have=$(docker image inspect -f '{{.Architecture}}' "$TAG" 2>/dev/null); then
  if [ "$have" = "$ARCH" ]; then
    say "$TAG already present ($(docker image inspect -f '{{.Id}}' "$TAG" | cut -c8-19))"
    exit 0
  fi
  say "$TAG present but its metadata says $have; rebuilding"
fi

# --- temp dirs, removed even on failure -------------------------------------------------------
WORK=""
cleanup() {
  [ -n "$WORK" ] && [ -d "$WORK" ] || return 0
  # An interrupted debootstrap can leave proc/sys/dev mounted inside the target: unmount those
  # first, deepest first, and never let rm cross into another file system.
  awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r \
    | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/crashlab-base-$ARCH.XXXXXX")

# --- rootfs tarball (cached) ------------------------------------------------------------------
mirror() {
  [ -n "${CRASHLAB_MIRROR:-}" ] && { echo "$CRASHLAB_MIRROR"; return; }
  local src=/etc/apt/sources.list.d/debian.sources uri=""
  if [ -r "$src" ]; then
    # deb822: the URIs of the first stanza whose Suites name $SUITE itself (not -security).
    uri=$(awk -v s="$SUITE" '
      BEGIN { RS = ""; FS = "\n" }
      { u = ""; ok = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/)   { split($i, a, /[ \t]+/); u = a[2] }
          if ($i ~ /^Suites:/) {
            n = split($i, b, /[ \t]+/)
            for (j = 2; j <= n; j++) if (b[j] == s) ok = 1
          }
        }
        if (ok && u != "") { print u; exit } }' "$src")
  fi
  if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
    uri=$(awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2; exit }' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ -s "$TARBALL" ]; then
  say "rootfs cached: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
else
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  command -v debootstrap >/dev/null || die "debootstrap not installed (docker/setup-linux.sh)"
  host=$(uname -m); [ "$host" = arm64 ] && host=aarch64
  if [ "$host" != "$qemu_arch" ]; then
    entry=/proc/sys/fs/binfmt_misc/qemu-$qemu_arch
    [ "$(head -n 1 "$entry" 2>/dev/null)" = enabled ] \
      || die "no binfmt handler qemu-$qemu_arch: run docker/setup-linux.sh first"
  fi
  MIRROR=$(mirror)
  say "debootstrap --variant=minbase --arch=$ARCH --include=python3,sqlite3 $SUITE from $MIRROR"
  t=$SECONDS
  mkdir "$WORK/rootfs"
  if ! debootstrap --variant=minbase --arch="$ARCH" --include=python3,sqlite3 \
        "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 20 "$WORK/debootstrap.log" >&2
    inner=$WORK/rootfs/debootstrap/debootstrap.log
    [ -r "$inner" ] && tail -n 20 "$inner" >&2
    die "debootstrap failed"
  fi
  say "debootstrap done in $(elapsed $t)"
  # Downloaded .debs and apt lists are dead weight in the image; /dev is the engine's.
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  mkdir -p "$CACHE"
  tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -C "$WORK/rootfs" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf --one-file-system "$WORK/rootfs"
  say "rootfs tarball: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
fi

# --- image ------------------------------------------------------------------------------------
mkdir "$WORK/ctx"
ln "$TARBALL" "$WORK/ctx/rootfs.tar" 2>/dev/null || cp "$TARBALL" "$WORK/ctx/rootfs.tar"
cat >"$WORK/ctx/Dockerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
CMD ["/bin/bash"]
EOF
t=$SECONDS
if ! DOCKER_BUILDKIT=0 docker build --platform "linux/$ARCH" \
      --label org.crashlab.image=base --label "org.crashlab.rootfs=$(basename "$TARBALL")" \
      -t "$TAG" "$WORK/ctx" >"$WORK/build.log" 2>&1; then
  tail -n 20 "$WORK/build.log" >&2
  die "docker build failed"
fi
got=$(docker image inspect -f '{{.Os}}/{{.Architecture}}' "$TAG")
[ "$got" = "linux/$ARCH" ] || die "built $TAG but its metadata says $got, not linux/$ARCH"
size=$(docker image inspect -f '{{.Size}}' "$TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')
say "built $TAG ($got, $size) in $(elapsed $t); total $(elapsed)"
