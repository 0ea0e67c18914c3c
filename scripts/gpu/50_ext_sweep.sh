#!/usr/bin/env bash
# Device call 8 of the 2026-11-26 run (run inline then, tarball 50a_ext): our router restarted for a decode server with
# local appends (sglang.decode_local_append=true); a chat whose second turn takes the D-route; a small sweep at N = 0
# and 32 background decode streams (issue 11's interference case), prefill vs decode vs auto.
source "$(dirname "$0")/env.sh"
trap 'collect 50a_ext' EXIT
stop router
start router --set router.policy=prefill --set sglang.decode_local_append=true
wait_up 90 router || exit 1
step chat_ext 90 python3 -m experiments.gpu_chat --base-url "$R/v1" --second-turn-policy decode \
  --out "$RES/chat_ext.json"
# (step named sweep_bg32 in that run's steps.txt; its output is sweep_bg = results/h200x2/sweep-load)
step sweep_bg32 220 python3 -m ppd.cli sweep --router-url "$R" --l-values 4096,16384 --m-values 16,256,2048 \
  --policies prefill,decode,auto --background-streams 0,32 --bg-output-tokens 2048 --output-dir "$RES/sweep_bg" \
  --name sweep --no-progress
