#!/usr/bin/env bash
# Set up a Linux (Debian) machine for crashlab: packages, a running Docker engine, binfmt_misc
# handlers for the emulated architecture. Idempotent; run as root (make setup, CI .ci/run).
#
#   docker/setup-linux.sh            install / start / register what is missing
#   docker/setup-linux.sh --check    only report; exit 1 when something is missing
#
# Works without systemd: dockerd is started in the background when `docker info` fails.
# Environment: DOCKERD_TIMEOUT (seconds to wait for the engine, default 60).
set -euo pipefail

DOCKERD_LOG=/var/log/crashlab-dockerd.log
APT_LOG=/var/log/crashlab-apt.log
DOCKERD_TIMEOUT=${DOCKERD_TIMEOUT:-60}
BINFMT_DIR=/proc/sys/fs/binfmt_misc
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"   # dockerd, mke2fs, debootstrap for non-root

CHECK=0
case "${1:-}" in
  --check) CHECK=1 ;;
  "") ;;
  -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

missing=()   # one entry per thing that is still not in place
say() { echo "$*"; }
lack() { missing+=("$1"); say "$1: MISSING${2:+ ($2)}"; }

# Host arch in qemu's naming; a handler is needed for each of these that is not native.
native=$(uname -m)
case "$native" in arm64) native=aarch64 ;; esac
emulated=()
for a in aarch64 x86_64; do [ "$a" = "$native" ] || emulated+=("$a"); done

is_root=0; [ "$(id -u)" = 0 ] && is_root=1
is_debian=0; [ -r /etc/debian_version ] && command -v apt-get >/dev/null && is_debian=1

# --- packages ---------------------------------------------------------------------------------
# package -> how to tell it is present (a command or a file), so that an engine installed another
# way (docker-ce) is accepted and not fought with.
#   ipxe-qemu: -M virt's default NIC (virtio-net-pci) needs efi-virtio.rom ("failed to find
#   romfile" otherwise). qemu-efi-aarch64 is not needed: guests boot with -kernel, not firmware.
pkg_present() {
  case "$1" in
    docker.io)        command -v dockerd >/dev/null && command -v docker >/dev/null ;;
    qemu-user-static) ls /usr/lib/binfmt.d/qemu-*.conf >/dev/null 2>&1 \
                        && command -v "qemu-${emulated[0]}-static" >/dev/null ;;
    debootstrap)      command -v debootstrap >/dev/null ;;
    e2fsprogs)        command -v mke2fs >/dev/null ;;
    qemu-system-x86)  command -v qemu-system-x86_64 >/dev/null ;;
    qemu-system-arm)  command -v qemu-system-aarch64 >/dev/null ;;
    ipxe-qemu)        [ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] ;;
  esac
}
PKGS=(docker.io qemu-user-static debootstrap e2fsprogs qemu-system-x86 qemu-system-arm ipxe-qemu)
need=()
for p in "${PKGS[@]}"; do pkg_present "$p" || need+=("$p"); done

if [ ${#need[@]} -eq 0 ]; then
  say "packages: present (${PKGS[*]})"
elif [ $CHECK = 1 ] || [ $is_root = 0 ] || [ $is_debian = 0 ]; then
  lack "packages" "apt-get install --no-install-recommends ${need[*]}"
else
  say "packages: installing ${need[*]} (apt-get update first)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; } \
        >"$APT_LOG" 2>&1; then
    echo "packages: apt-get failed; last lines of $APT_LOG:" >&2
    tail -n 15 "$APT_LOG" >&2; exit 1
  fi
  still=()
  for p in "${need[@]}"; do pkg_present "$p" || still+=("$p"); done
  if [ ${#still[@]} -gt 0 ]; then
    echo "packages: installed but still not usable: ${still[*]}" >&2; exit 1
  fi
  say "packages: installed ${need[*]} (log: $APT_LOG)"
fi

# --- cgroups (dockerd needs them; a machine without systemd may not mount any) ----------------
if grep -qE '^[^ ]+ [^ ]+ cgroup2? ' /proc/mounts; then
  :
elif [ $CHECK = 1 ] || [ $is_root = 0 ]; then
  lack "cgroups" "nothing mounted on /sys/fs/cgroup"
else
  mount -t cgroup2 none /sys/fs/cgroup
  say "cgroups: mounted cgroup2 on /sys/fs/cgroup"
fi

# --- docker engine ----------------------------------------------------------------------------
engine_version() { timeout 10 docker version --format '{{.Server.Version}}' 2>/dev/null; }

if v=$(engine_version) && [ -n "$v" ]; then
  say "docker engine: running $v"
elif ! command -v dockerd >/dev/null; then
  lack "docker engine" "dockerd not installed"
elif [ $CHECK = 1 ] || [ $is_root = 0 ]; then
  if [ $is_root = 0 ] && [ -S /var/run/docker.sock ]; then
    lack "docker engine" "not reachable: is $(id -un) in group docker?"
  else
    lack "docker engine" "not running; start it as root: $0"
  fi
else
  # setsid + nohup: dockerd must outlive this script and its terminal.
  echo "--- $(date -Is) started by $0" >>"$DOCKERD_LOG"
  setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  pid=$!
  deadline=$((SECONDS + DOCKERD_TIMEOUT))
  v=""
  while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "docker engine: dockerd exited during start-up; last lines of $DOCKERD_LOG:" >&2
      tail -n 15 "$DOCKERD_LOG" >&2; exit 1
    fi
    if [ -S /var/run/docker.sock ] && v=$(engine_version) && [ -n "$v" ]; then break; fi
    sleep 0.5
  done
  if [ -z "$v" ]; then
    kill "$pid" 2>/dev/null || true   # a half-started engine would only confuse the next run
    echo "docker engine: dockerd (pid $pid) did not answer within ${DOCKERD_TIMEOUT}s," \
         "stopped it; last lines of $DOCKERD_LOG:" >&2
    tail -n 15 "$DOCKERD_LOG" >&2; exit 1
  fi
  say "docker engine: started dockerd $v (pid $pid, log: $DOCKERD_LOG)"
fi

# --- binfmt_misc ------------------------------------------------------------------------------
if [ -e "$BINFMT_DIR/register" ]; then
  say "binfmt_misc: mounted"
elif [ $CHECK = 1 ] || [ $is_root = 0 ]; then
  lack "binfmt_misc" "not mounted on $BINFMT_DIR"
else
  mount -t binfmt_misc binfmt_misc "$BINFMT_DIR"
  say "binfmt_misc: mounted on $BINFMT_DIR"
fi

# One handler per emulated arch, from qemu-user-static's /usr/lib/binfmt.d/qemu-ARCH.conf.
# Flag F (fix binary) makes the kernel open the interpreter at registration, so it works inside
# containers whose file system has no qemu; a handler registered without F is replaced.
for a in "${emulated[@]}"; do
  name=qemu-$a
  conf=/usr/lib/binfmt.d/$name.conf
  entry=$BINFMT_DIR/$name
  if [ -e "$entry" ]; then
    flags=$(sed -n 's/^flags: *//p' "$entry")
    state=$(head -n 1 "$entry")
    if [ "$state" = enabled ] && [[ "$flags" == *F* ]]; then
      say "binfmt: $name already registered (flags $flags)"
      continue
    fi
    if [ $CHECK = 1 ] || [ $is_root = 0 ]; then
      lack "binfmt: $name" "registered but $state, flags '$flags' (F needed)"; continue
    fi
    echo -1 >"$entry"   # unregister, then register again below with F
    say "binfmt: $name was $state with flags '$flags'; re-registering"
  fi
  if [ ! -r "$conf" ]; then
    lack "binfmt: $name" "no $conf (qemu-user-static)"; continue
  fi
  if [ $CHECK = 1 ] || [ $is_root = 0 ] || [ ! -e "$BINFMT_DIR/register" ]; then
    lack "binfmt: $name" "not registered"; continue
  fi
  line=$(grep -v '^[[:space:]]*#' "$conf" | grep -m1 "^:$name:")
  # Fields: :name:type:offset:magic:mask:interpreter:flags -- add F when absent.
  flags=${line##*:}
  [[ "$flags" == *F* ]] || line="${line}F"
  printf '%s' "$line" >"$BINFMT_DIR/register"
  say "binfmt: registered $name (flags $(sed -n 's/^flags: *//p' "$entry"))"
done

# --- verdict ----------------------------------------------------------------------------------
if [ ${#missing[@]} -gt 0 ]; then
  why=""
  [ $is_root = 0 ] && why=" (not root: run as root to fix)"
  [ $is_debian = 0 ] && why=" (not Debian: install the missing pieces with your package manager)"
  joined=$(printf '%s; ' "${missing[@]}")
  echo "setup: missing: ${joined%; }$why" >&2
  exit 1
fi
say "setup: ok"
