#!/usr/bin/env bash
# Idempotent: an aarch64 Python 3.11 + TVM runtime that runs on this x86 machine under qemu-user,
# so TVM libraries cross-compiled for aarch64 Linux can be executed and checked bit-exactly.
#
#   scripts/setup_aarch64.sh
#
# Builds, once, under ${DYADIQ_CACHE:-$HOME/.cache/dyadiq}/aarch64:
#   sysroot/         Debian bookworm arm64 packages (python3.11, libc, libstdc++...) unpacked
#                    with dpkg -x (nothing is installed into the host's package database)
#   site-packages/   aarch64 wheels of apache-tvm (runtime only), apache-tvm-ffi, numpy from PyPI
# and the host tools qemu-user and gcc-aarch64-linux-gnu. A stamp file records the finished
# build, so later runs (CI) return at once without downloading anything. As root it runs
# `dpkg --add-architecture arm64` and apt-get itself; otherwise it prints what to run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions: the TVM pair matches pyproject.toml; numpy and typing_extensions are the host venv's.
# ml_dtypes is left out on purpose: TVM imports it only if present, needs it only for bfloat16 /
# float8 tensors (integer programs have none), and its import alone takes 6 s under qemu.
wheels=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6
  typing_extensions==4.16.0)
debs=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6 libgcc-s1
  libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libcrypt1 libuuid1)

root="${DYADIQ_CACHE:-$HOME/.cache/dyadiq}/aarch64"
layout=2  # bump when the build steps below change, so cached builds are redone
recipe=$(printf '%s\n' "$layout" "${wheels[@]}" "${debs[@]}" | sha256sum | cut -c1-16)
stamp="$root/.ready-$recipe"
say() { echo "setup_aarch64: $*" >&2; }
is_root() { [ "$(id -u)" = 0 ]; }

missing_tools=()
command -v qemu-aarch64 >/dev/null || missing_tools+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || missing_tools+=(gcc-aarch64-linux-gnu)
if [ -e "$stamp" ] && [ ${#missing_tools[@]} = 0 ]; then
  say "ready: $root (stamp $(basename "$stamp"))"
  exit 0
fi

if ! is_root; then
  if [ ${#missing_tools[@]} -gt 0 ]; then
    say "please run: sudo apt-get install ${missing_tools[*]}"
  fi
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    say "please run: sudo dpkg --add-architecture arm64 && sudo apt-get update"
    say "then run this script again"
    exit 1
  fi
fi

apt_updated=0
if is_root && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  say "dpkg --add-architecture arm64"
  dpkg --add-architecture arm64
  say "apt-get update"
  apt-get update -qq
  apt_updated=1
fi
if [ ${#missing_tools[@]} -gt 0 ]; then
  is_root || exit 1
  if [ $apt_updated = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "apt-get install ${missing_tools[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_tools[@]}" >/dev/null
fi
if [ -e "$stamp" ]; then
  say "ready: $root"
  exit 0
fi

# One build at a time (two test sessions may call this together); the winner's stamp ends the
# other's wait.
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9
if [ -e "$stamp" ]; then
  say "ready: $root (built by a concurrent run)"
  exit 0
fi

# Build into a scratch folder next to the final one and move it into place at the end, so an
# interrupted run never leaves a half-built sysroot behind a stamp.
work=$(mktemp -d "$root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/wheels" "$work/sysroot" "$work/site-packages"

arm64_debs=()
for name in "${debs[@]}"; do arm64_debs+=("$name:arm64"); done
say "apt-get download ${arm64_debs[*]}"
if ! (cd "$work/debs" && apt-get download -qq "${arm64_debs[@]}" 2>/dev/null); then
  # A stale package index names versions the mirror no longer has: refresh once and retry.
  if is_root && [ $apt_updated = 0 ]; then
    say "apt-get update (download failed with the current index)"
    apt-get update -qq
    (cd "$work/debs" && apt-get download -qq "${arm64_debs[@]}")
  else
    say "apt-get download failed; run 'apt-get update' (as root) and try again"
    exit 1
  fi
fi
for deb in "$work"/debs/*.deb; do
  dpkg -x "$deb" "$work/sysroot"
done

host_python=".venv/bin/python"
[ -x "$host_python" ] || host_python=python3
say "pip download (manylinux_2_28_aarch64, cp311) ${wheels[*]}"
"$host_python" -m pip download -q --disable-pip-version-check --dest "$work/wheels" \
  --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
  --only-binary=:all: --no-deps "${wheels[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
for wheel in "$work"/wheels/*.whl; do
  "$host_python" -m zipfile -e "$wheel" "$work/site-packages"
done
# Runs use TVM's runtime-only mode (TVM_USE_RUNTIME_LIB=1), which never loads the 240 MB
# compiler library: leave it out of the cache.
rm -f "$work/site-packages/tvm/lib/libtvm_compiler.so"

# Debian's python3.11-minimal ships no .pyc files (its postinst makes them): compile them here
# with the host's Python 3.11 (same bytecode), so the first emulated run is not the slowest.
# Best effort: a file that does not compile only costs time, and the check below must pass.
say "compileall (host python) sysroot/usr/lib/python3.11 site-packages"
"$host_python" -m compileall -q -j 0 "$work/sysroot/usr/lib/python3.11" "$work/site-packages" \
  >/dev/null 2>&1 || true

say "checking: qemu-aarch64 python3.11 -c 'import tvm.runtime, numpy'"
PYTHONPATH="$work/site-packages" TVM_USE_RUNTIME_LIB=1 PYTHONNOUSERSITE=1 \
  qemu-aarch64 -L "$work/sysroot" "$work/sysroot/usr/bin/python3.11" -c \
  "import numpy, tvm, tvm.runtime.vm; print('aarch64 python', numpy.__version__, tvm.__version__)" >&2

rm -rf "$root/sysroot" "$root/site-packages" "$root"/.ready-*
mv "$work/sysroot" "$root/sysroot"
mv "$work/site-packages" "$root/site-packages"
touch "$stamp"
say "ready: $root"
