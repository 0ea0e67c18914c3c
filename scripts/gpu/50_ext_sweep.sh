#!/usr/bin/env bash
# Device call: our router restarted for a decode server with local appends (sglang.decode_local_append=true); a chat
# whose second turn takes the D-route; the --minimal sweep with prefill vs decode; a small sweep under 32 background
# decode streams (issue 11's interference case).
source "$(dirname "$0")/env.sh"
trap 'collect 50_ext_sweep' EXIT
stop router
start router --set router.policy=prefill --set sglang.decode_local_append=true
wait_up 90 router || exit 1
step chat_ext 90 python3 -m experiments.gpu_chat --base-url "$R/v1" --second-turn-policy decode \
  --out "$RES/chat_ext.json"
step sweep_minimal_dvp 200 python3 -m ppd.cli sweep --router-url "$R" --minimal --policies prefill,decode \
  --repetitions 3 --output-dir "$RES/sweep_minimal_dvp" --name sweep --no-progress
step sweep_bg32 220 python3 -m ppd.cli sweep --router-url "$R" --l-values 16384 --m-values 16,2048 \
  --policies prefill,decode --background-streams 0,32 --bg-output-tokens 2048 --output-dir "$RES/sweep_bg" \
  --name sweep --no-progress
