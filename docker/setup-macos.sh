#!/usr/bin/env bash
# Check a Mac for crashlab: Docker Desktop installed and running, amd64 emulation available.
# Installs nothing; says what is missing and exits 1. (`--check` is accepted for symmetry with
# setup-linux.sh; this script only ever reports.)
set -uo pipefail

missing=()
say() { echo "$*"; }
lack() { missing+=("$1"); say "$1: MISSING${2:+ ($2)}"; }

[ "$(uname -s)" = Darwin ] || { echo "not macOS: use docker/setup-linux.sh" >&2; exit 2; }

arch=$(uname -m)   # arm64 on Apple silicon, x86_64 on Intel Macs
say "host: macOS $(sw_vers -productVersion 2>/dev/null) on $arch"

if ! command -v docker >/dev/null; then
  lack "docker CLI" "install Docker Desktop: https://docs.docker.com/desktop/"
elif ! v=$(docker version --format '{{.Server.Version}}' 2>/dev/null) || [ -z "$v" ]; then
  lack "docker engine" "start Docker Desktop (open -a Docker) and wait until it says running"
else
  os=$(docker info --format '{{.OperatingSystem}}' 2>/dev/null)
  say "docker engine: running $v ($os)"
  # Images are pulled from Docker Hub on a Mac; the other arch runs under QEMU/Rosetta in the
  # Docker Desktop VM, which registers its own binfmt handlers.
  other=amd64; [ "$arch" = x86_64 ] && other=arm64
  if out=$(docker run --rm --platform "linux/$other" debian:bookworm-slim uname -m 2>&1); then
    say "emulation: linux/$other runs ($out)"
  else
    lack "emulation: linux/$other" "$(echo "$out" | tail -n 1)"
  fi
fi

for tool in qemu-system-x86_64 qemu-system-aarch64; do
  if command -v "$tool" >/dev/null; then say "$tool: present"
  else say "$tool: absent (optional, only for VM targets: brew install qemu)"; fi
done

if [ ${#missing[@]} -gt 0 ]; then
  joined=$(printf '%s; ' "${missing[@]}")
  echo "setup: missing: ${joined%; }" >&2
  exit 1
fi
say "setup: ok"
