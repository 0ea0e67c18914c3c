#!/usr/bin/env bash
# Session-2 block, call 5 (after receive.sh of the last chunk and setup.sh, same call): the PD pair with our
# decode-side append from the start (prefill GPU0 stock, decode GPU1 through ppd.sglang.ext, KV over NVLink), the
# router with `auto` and local appends, and a two-turn chat whose second turn takes the D-route.
DEADLINE=${DEADLINE:-470}
source "$(dirname "$0")/env.sh"
trap 'collect 110_up_ext' EXIT
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$LOGS/gpus.txt" 2>&1
start prefill-0
start decode-0 --set sglang.decode_local_append=true
wait_up 400 prefill-0 decode-0 || exit 1
start router --set router.policy=auto --set sglang.decode_local_append=true
wait_up 90 router || exit 1
step chat_ext 90 python3 -m experiments.gpu_chat --base-url "$R/v1" --second-turn-policy decode --out "$RES/chat_ext.json"
