#!/usr/bin/env bash
# Session-2 block: the multi-turn chat replay at two request rates, 4 policies, SLO goodput (issue 6). Every policy
# starts from empty server caches (--flush-caches) and each rate has its own seed, so no run reuses another's prompts
# or inherits its KV pool state (both confounded the 2026-11-26 replays).
source "$(dirname "$0")/env.sh"
trap 'collect 120_replay' EXIT
step replay_r4 260 python3 -m ppd.cli replay --router-url "$R" --workload chat --conversations 16 --mean-turns 4 \
  --think-mean-s 1 --request-rate 4 --slo-ttft-ms 200 --slo-tpot-ms 20 --policies prefill,decode,threshold,auto \
  --seed 204 --flush-caches --output-dir "$RES/replay_r4" --name replay --no-progress
step replay_r16 260 python3 -m ppd.cli replay --router-url "$R" --workload chat --conversations 32 --mean-turns 4 \
  --think-mean-s 1 --request-rate 16 --slo-ttft-ms 200 --slo-tpot-ms 20 --policies prefill,decode,threshold,auto \
  --seed 216 --flush-caches --output-dir "$RES/replay_r16" --name replay --no-progress
