#!/usr/bin/env bash
# Device call: with the stock PD pair (NVLink) and our router from 10_up.sh still running. KV bandwidth, the TTFT vs
# context table, the stock P-route's tokens (for the identity table later), SGLang's own router (Rust and MiniLB) vs
# ours, and the --minimal sweep with the prefill policy.
source "$(dirname "$0")/env.sh"
trap 'collect 20_measure' EXIT
step kv_bandwidth_nvlink 90 python3 -m experiments.gpu_kv_bandwidth "${PD_ARGS[@]}" --link nvlink --out "$RES/kv_bandwidth_nvlink.json"
step context_table_nvlink 200 python3 -m experiments.gpu_context_table "${PD_ARGS[@]}" --mode pd \
  --lengths 1024,2048,4096,8192,16384,32768,65536,128000 --out "$RES/context_table_pd_nvlink.json"
step identity_stock 60 python3 -m experiments.gpu_identity run "${PD_ARGS[@]}" --paths prefill --suffix @stock \
  --out "$RES/identity_stock_prefill.json"
router_compare
step sweep_minimal_prefill 150 python3 -m ppd.cli sweep --router-url "$R" --minimal --policies prefill \
  --output-dir "$RES/sweep_minimal_prefill" --name sweep --no-progress
