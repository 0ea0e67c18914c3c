#!/usr/bin/env bash
# Session-2 block 2: 140_load_tcp.sh with the background streams sent straight to the servers (--bg-direct; see
# 170_load_nvlink_direct.sh). KV over Mooncake TCP (MC_FORCE_TCP=1), the router told link.kind=mooncake-tcp.
source "$(dirname "$0")/env.sh"
trap 'collect 190_load_tcp_direct' EXIT
restart_pd_tcp || exit 1
step sweep_load_tcp_direct 420 python3 -m ppd.cli sweep --router-url "$R" --l-values 1024,4096,16384 \
  --m-values 16,256,1024,2048 --policies prefill,decode,threshold,auto --background-streams 0,32 \
  --bg-output-tokens 4096 --bg-direct --flush-caches --hardware prefill=h200,decode=h200 --link mooncake-tcp \
  --output-dir "$RES/sweep_load_tcp_direct" --name sweep --no-progress
