#!/usr/bin/env bash
# Device call: the decode server restarted through ppd.sglang.ext.launch_server (radix cache kept, local appends).
# 1. a normal server on GPU0 + the extended decode server on GPU1: the same conversation by single server and by
#    D-route only; 2. the normal server replaced by the prefill server: by P-route, and P-route then D-route;
# 3. the token-identity table (with the stock P-route from 20_measure.sh); 4. P vs D append TTFT, no router.
# DECODE_SETS adds ppd launch overrides for the decode server, e.g. the fallback if the overlap scheduler misbehaves:
#   DECODE_SETS='--set decode.0.extra_args=["--disable-overlap-schedule"]' bash scripts/gpu/40_ext_identity.sh
source "$(dirname "$0")/env.sh"
trap 'collect 40_ext_identity' EXIT
for name in prefill-0 decode-0 colocated-0; do stop $name; done
wait_gpu_free 0
wait_gpu_free 1
start colocated-0 "${SINGLE_SETS[@]}"
start decode-0 --set sglang.decode_local_append=true ${DECODE_SETS:-}
wait_up 240 colocated-0 decode-0 || exit 1
grep -h "ppd.sglang.ext" "$(cat "$RUN/decode-0.log")" | sort | uniq -c
step identity_single_decode 90 python3 -m experiments.gpu_identity run "${PD_ARGS[@]}" --single "$S" --paths single,decode \
  --out "$RES/identity_single_decode.json"
stop colocated-0
wait_gpu_free 0
start prefill-0
wait_up 180 prefill-0 || exit 1
step identity_prefill_ext 90 python3 -m experiments.gpu_identity run "${PD_ARGS[@]}" --paths prefill,prefill-then-decode \
  --out "$RES/identity_prefill_ext.json"
step identity_table 30 python3 -m experiments.gpu_identity compare "$RES/identity_single_decode.json" \
  "$RES/identity_prefill_ext.json" "$RES/identity_stock_prefill.json" --out "$RES/identity.json"
step append_d_vs_p 150 python3 -m experiments.gpu_append "${PD_ARGS[@]}" --l-values 2048,16384 --m-values 16,256,2048 --reps 3 \
  --out "$RES/append_d_vs_p.json"
