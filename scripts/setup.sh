#!/usr/bin/env bash
# Idempotent setup on a fresh Debian machine: the Debian packages that hold the zoo's real data,
# a virtual environment cached under the home directory (linked as ./.venv), and dyadiq itself.
#   scripts/setup.sh        runtime + zoo extras
#   scripts/setup.sh dev    also the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras="zoo"
[ "${1:-}" = "dev" ] && extras="dev"

need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -d /usr/share/doc/opencv-doc/examples/data ] || need+=(opencv-doc)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
# The backends' toolchains: Cortex-M C (arm-none-eabi + newlib, run on qemu-system-arm) and
# aarch64 Linux (cross gcc, run under qemu-user in the tests).
command -v arm-none-eabi-gcc >/dev/null || need+=(gcc-arm-none-eabi)
[ -d /usr/lib/arm-none-eabi/newlib ] || need+=(libnewlib-arm-none-eabi)
command -v qemu-system-arm >/dev/null || need+=(qemu-system-arm)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
# The tests render report.html in headless Chromium (Playwright cannot download its browsers).
if [ "$extras" = dev ]; then command -v chromium >/dev/null || need+=(chromium); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: please run: sudo apt-get install ${need[*]}" >&2
  fi
fi

venv="${DYADIQ_VENV:-$HOME/.cache/dyadiq/venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  mkdir -p "$(dirname "$venv")"
  python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
if [ -e .venv ] && [ ! -L .venv ]; then
  echo "setup: ./.venv exists and is not the cached venv; leaving it, using $venv" >&2
else
  ln -sfn "$venv" .venv
fi
stamp="$venv/.dyadiq-$(sha256sum pyproject.toml | cut -c1-16)-$extras-$(pwd | sha256sum | cut -c1-8)"
# The venv is shared by every checkout on this machine (CI's clean one included) and an editable
# install points at one checkout only: reinstall when it points elsewhere, not only when the
# stamp is missing, or this checkout would silently import another one's backends.
installed_here() {
  (cd / && "$venv/bin/python" -c "import os, sys, dyadiq.backends as b; sys.exit(os.path.dirname(os.path.realpath(b.__file__)) != sys.argv[1])" "$(pwd -P)/backends") 2>/dev/null
}
if [ ! -e "$stamp" ] || ! installed_here; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c "import dyadiq.pipeline" && touch "$stamp"
fi
"$venv/bin/python" -c "import dyadiq.pipeline"
# The test suite runs aarch64 TVM libraries under qemu-user: an emulated Python + TVM runtime,
# built once into the cache (returns at once when present).
if [ "$extras" = "dev" ]; then
  bash scripts/setup_aarch64.sh
fi
