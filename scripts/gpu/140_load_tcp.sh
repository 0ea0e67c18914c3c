#!/usr/bin/env bash
# Session-2 block: the same load sweep with KV over Mooncake's TCP transport (MC_FORCE_TCP=1: the slow-link case of
# clusters without RDMA). Both servers restarted with sglang.transport=tcp, the router told link.kind=mooncake-tcp
# (so `auto` prices the slow link and does not apply the NVLink calibration).
source "$(dirname "$0")/env.sh"
trap 'collect 140_load_tcp' EXIT
restart_pd_tcp || exit 1
step sweep_load_tcp 420 python3 -m ppd.cli sweep --router-url "$R" --l-values 1024,4096,16384 \
  --m-values 16,256,1024,2048 --policies prefill,decode,threshold,auto --background-streams 0,32 \
  --bg-output-tokens 4096 --flush-caches --hardware prefill=h200,decode=h200 --link mooncake-tcp \
  --output-dir "$RES/sweep_load_tcp" --name sweep --no-progress
