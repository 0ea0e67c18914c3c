#!/usr/bin/env bash
# Session-2 block 2: our router (forced `prefill` by header) vs sglang-router 0.3.2 (Rust) and its mini-lb on the
# running PD pair: same tokens, TTFT p50/mean and the per-round paired difference (9 rounds, routers rotated).
source "$(dirname "$0")/env.sh"
trap 'collect 180_router_compare' EXIT
bg sglang-router python3 -m sglang_router.launch_router --pd-disaggregation --prefill "$P" "$BP" --decode "$D" \
  --host 127.0.0.1 --port 8100
bg mini-lb python3 -m sglang_router.launch_router --pd-disaggregation --mini-lb --prefill "$P" "$BP" --decode "$D" \
  --host 127.0.0.1 --port 8200
wait_up 45 sglang-router mini-lb || say "a reference router is not up (its rows will show errors)"
step router_compare 240 python3 -m experiments.gpu_router_compare --prefill "$P" --decode "$D" --ours "$R" \
  --sglang http://127.0.0.1:8100 --mini-lb http://127.0.0.1:8200 --lengths 512,2048,8192 --reps 9 --warmup 2 \
  --out "$RES/router_compare.json"
stop sglang-router
stop mini-lb
