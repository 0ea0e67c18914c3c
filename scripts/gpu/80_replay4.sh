#!/usr/bin/env bash
# Device call 11 (run inline on 2026-11-26, tarball 80_replay4): the chat replay at 4 req/s, 24 conversations (32 did
# not fit a call). Note: replay nonces depend on (workload, policy, seed) only, so on the same servers this run reuses
# the prompts of the earlier replays (results/h200x2/README.md); pass another --seed or flush the caches first.
source "$(dirname "$0")/env.sh"
trap 'collect 80_replay4' EXIT
step replay_r4 300 python3 -m ppd.cli replay --router-url "$R" --workload chat --conversations 24 --mean-turns 4 \
  --think-mean-s 1 --request-rate 4 --slo-ttft-ms 200 --slo-tpot-ms 20 --policies prefill,decode,threshold,auto \
  --output-dir "$RES/replay_r4" --name replay --no-progress
