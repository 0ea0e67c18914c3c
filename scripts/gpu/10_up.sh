#!/usr/bin/env bash
# Device call: right after setup.sh (same call). Stock SGLang PD pair from `ppd launch`'s plan (prefill GPU0,
# decode GPU1, KV over Mooncake/NVLink), our router with the prefill policy, a PD smoke request, and a two-turn
# chat through the router with the official openai client (non-stream and stream).
DEADLINE=${DEADLINE:-470}  # this block shares its call with receive.sh + setup.sh (up to ~60 s before it)
source "$(dirname "$0")/env.sh"
trap 'collect 10_up' EXIT
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$LOGS/gpus.txt" 2>&1
start prefill-0
start decode-0
wait_up 400 prefill-0 decode-0 || exit 1
start router --set router.policy=prefill
wait_up 90 router || say "router not up: the router steps below will fail (logged)"
step smoke_pd 90 python3 -m experiments.gpu_context_table "${PD_ARGS[@]}" --mode pd --lengths 1024,16384 --max-new-tokens 16 \
  --out "$RES/smoke_pd.json"
step chat 120 python3 -m experiments.gpu_chat --base-url "$R/v1" --out "$RES/chat.json"
