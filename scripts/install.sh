#!/usr/bin/env bash
# Set up P-PD on a fresh Debian/Ubuntu machine (no GPU needed); safe to run again.
#   1. system libraries Mooncake's transfer engine loads (TCP transport on a CPU box): libibverbs1 librdmacm1 libnuma1
#   2. a virtual environment in .venv with the package, its console script `ppd` and the test tools ([dev] extra)
# Env: PYTHON (interpreter, default python3, >= 3.10), VENV (default .venv), EXTRAS (default dev; "dev,gpu" on a GPU
# node with CUDA), VENV_FLAGS (e.g. --system-site-packages to reuse an image's torch/sglang).
# Then: .venv/bin/ppd launch --config configs/local.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
say() { echo "[install] $*"; }

command -v "$PYTHON" >/dev/null || { echo "[install] $PYTHON not found: install Python >= 3.10 first" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  { echo "[install] $("$PYTHON" --version 2>&1) is too old: P-PD needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }

# --- system packages (only those missing; apt-get update only when something is) -------------------------------
pkgs=(libibverbs1 librdmacm1 libnuma1)
# Debian's python3 has no ensurepip without its -venv package
if [ ! -x "$VENV/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  pkgs+=("python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
fi
if command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    say "apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    say "system packages present: ${pkgs[*]}"
  fi
else
  say "not a Debian/Ubuntu system: install ${pkgs[*]} (or your distribution's names for them) yourself"
fi

# --- Python environment ---------------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv ${VENV_FLAGS:-} "$VENV"
fi
say "pip install -e .[$EXTRAS]"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
"$VENV/bin/ppd" --help >/dev/null
say "done: $VENV/bin/ppd launch --config configs/local.yaml   (tests: $VENV/bin/python -m pytest)"
