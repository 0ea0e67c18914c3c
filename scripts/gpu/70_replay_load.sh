#!/usr/bin/env bash
# Device call 10 (run inline on 2026-11-26, tarball 70_replay): the multi-turn chat replay at 16 req/s with SLO
# goodput per policy, then the load sweep at N = 32 background streams (12 points, 4 policies). That call first ran the
# 4 req/s replay with 32 conversations; it hit its 170 s step limit and wrote nothing (80_replay4.sh reran it smaller).
source "$(dirname "$0")/env.sh"
trap 'collect 70_replay' EXIT
step replay_r16 200 python3 -m ppd.cli replay --router-url "$R" --workload chat --conversations 32 --mean-turns 4 \
  --think-mean-s 1 --request-rate 16 --slo-ttft-ms 200 --slo-tpot-ms 20 --policies prefill,decode,threshold,auto \
  --output-dir "$RES/replay_r16" --name replay --no-progress
step sweep_bg32_full 200 python3 -m ppd.cli sweep --router-url "$R" --l-values 1024,4096,16384 \
  --m-values 16,256,1024,2048 --policies prefill,decode,threshold,auto --background-streams 32 \
  --bg-output-tokens 4096 --output-dir "$RES/sweep_bg32" --name sweep --no-progress
