#!/usr/bin/env bash
# Device call: the same PD pair restarted with KV over Mooncake's TCP transport (MC_FORCE_TCP=1, sglang.transport=tcp:
# the slow-link case of clusters without RDMA); KV bandwidth, the context table up to 32k, the --minimal sweep.
source "$(dirname "$0")/env.sh"
trap 'collect 30_tcp' EXIT
stop prefill-0
stop decode-0
wait_gpu_free 0
wait_gpu_free 1
start prefill-0 --set sglang.transport=tcp
start decode-0 --set sglang.transport=tcp
wait_up 240 prefill-0 decode-0 || exit 1
step kv_bandwidth_tcp 90 python3 -m experiments.gpu_kv_bandwidth "${PD_ARGS[@]}" --link tcp --out "$RES/kv_bandwidth_tcp.json"
step context_table_tcp 150 python3 -m experiments.gpu_context_table "${PD_ARGS[@]}" --mode pd --lengths 1024,4096,16384,32768 \
  --out "$RES/context_table_pd_tcp.json"
step sweep_minimal_prefill_tcp 120 python3 -m ppd.cli sweep --router-url "$R" --minimal --policies prefill \
  --output-dir "$RES/sweep_minimal_prefill_tcp" --name sweep --no-progress
stop prefill-0
stop decode-0
