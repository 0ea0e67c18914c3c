#!/usr/bin/env bash
# Session-2 block 2: our router (forced `prefill` by header) vs sglang-router 0.3.2 (Rust) and its mini-lb on the
# running PD pair: same tokens, TTFT p50/mean and the per-round paired difference (9 rounds, routers rotated).
source "$(dirname "$0")/env.sh"
trap 'collect 180_router_compare' EXIT
router_compare
