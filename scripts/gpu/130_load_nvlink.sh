#!/usr/bin/env bash
# Session-2 block: issue 11's load sweep on 2xH200 with KV over NVLink: N in {0, 32} background decode streams,
# 12 points, 4 policies, caches flushed before each level (the phantom-prefill-queue fix is in the router now).
source "$(dirname "$0")/env.sh"
trap 'collect 130_load_nvlink' EXIT
step sweep_load_nvlink 540 python3 -m ppd.cli sweep --router-url "$R" --l-values 1024,4096,16384 \
  --m-values 16,256,1024,2048 --policies prefill,decode,threshold,auto --background-streams 0,32 \
  --bg-output-tokens 4096 --flush-caches --hardware prefill=h200,decode=h200 --link nvlink \
  --output-dir "$RES/sweep_load_nvlink" --name sweep --no-progress
