#!/usr/bin/env bash
# Device call 9 (run inline on 2026-11-26, tarball 60_full): the full 72-point m x L sweep (m = 1..2048, L = 512..16384)
# with the four policies through the router of 50_ext_sweep.sh (auto calibrates online on the same run); 174 s there.
source "$(dirname "$0")/env.sh"
trap 'collect 60_full' EXIT
step sweep_full 540 python3 -m ppd.cli sweep --router-url "$R" --policies prefill,decode,threshold,auto \
  --repetitions 1 --output-dir "$RES/sweep_full" --name sweep --no-progress
