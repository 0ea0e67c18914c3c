#!/usr/bin/env bash
# Session-2 block 2: 130_load_nvlink.sh again with the background streams sent straight to the servers (--bg-direct)
# and incremental streaming output on the servers (sglang.incremental_streaming_output, now the default). In block 1
# the 32 streams went through the router, whose event loop and the client's fell behind relaying ~4,500 tokens/s of
# SGLang's cumulative output_ids: token gaps p50 0.3 ms then 100+ ms bursts, which the sweep counted as stall.
source "$(dirname "$0")/env.sh"
trap 'collect 170_load_nvlink_direct' EXIT
step sweep_load_nvlink_direct 540 python3 -m ppd.cli sweep --router-url "$R" --l-values 1024,4096,16384 \
  --m-values 16,256,1024,2048 --policies prefill,decode,threshold,auto --background-streams 0,32 \
  --bg-output-tokens 4096 --bg-direct --flush-caches --hardware prefill=h200,decode=h200 --link nvlink \
  --output-dir "$RES/sweep_load_nvlink_direct" --name sweep --no-progress
