# Sourced by every on-box script: paths, environment, and helpers to start/stop processes of the ppd launch plan.
# The box runs each device call in a fresh copy of the working tree; what lives on is /root (staged wheels in
# /root/site, logs and results in /root/run) and processes started in their own session (setsid).
set -o pipefail
export REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$REPO"
export PYTHONPATH=/root/site:$REPO
export PYTHONUNBUFFERED=1
# NVLink multicast off: the lent multi-GPU machines require it (KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PPD_CFG=${PPD_CFG:-configs/h200x2-llama3-8b.yaml}
export RUN=${PPD_GPU_RUN:-/root/run}
export LOGS=$RUN/logs RES=$RUN/results
mkdir -p "$LOGS" "$RES"
# the config's servers (PPD_* override them for a rehearsal against the emulated stack, docs/gpu.md)
P=${PPD_P:-http://127.0.0.1:31000} D=${PPD_D:-http://127.0.0.1:31001} S_PORT=${PPD_S_PORT:-31002}
S=http://127.0.0.1:$S_PORT
R=${PPD_R:-http://127.0.0.1:8000} BP=${PPD_BP:-8998}
PD_ARGS=(--prefill "$P" --decode "$D" --bootstrap-port "$BP")
# metrics: KV bandwidth is read from the prefill server's Prometheus histograms; per-request stats go to the logs
BASE_SETS=(--set 'sglang.extra_args=["--enable-request-time-stats-logging"]' ${PPD_EXTRA_SETS:-})
# a normal (non-disaggregated) server on GPU0, same flags: the reference of the token-identity check
SINGLE_SETS=(--set mode=colocated --set "colocated=[{host: 127.0.0.1, port: $S_PORT, gpu_ids: [0]}]")

say() { echo "[$(date +%T) +${SECONDS}s] $*"; }

# start NAME [--set ...]: one process of `ppd launch`'s plan (prefill-0, decode-0, colocated-0, router) in its own
# session, log in $LOGS/NAME.N.log. `ppd launch --only` execs the exact command line and env of the full launch.
start() {
  local name=$1; shift
  local n=0; while [ -e "$LOGS/$name.$n.log" ]; do n=$((n + 1)); done
  local log=$LOGS/$name.$n.log
  echo "$*" > "$RUN/$name.sets"
  setsid nohup python3 -m ppd.cli launch --config "$PPD_CFG" "${BASE_SETS[@]}" "$@" --only "$name" \
    > "$log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
  echo "$log" > "$RUN/$name.log"
  say "started $name (pid $!, log $log) $*"
}

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# stop NAME: SIGTERM to its process group (SGLang tears down its scheduler/detokenizer children), SIGKILL after 30 s
stop() {
  local name=$1 pid
  [ -f "$RUN/$name.pid" ] || return 0
  pid=$(cat "$RUN/$name.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$RUN/$name.pid"
  say "stopped $name"
}

# wait_gpu_free IDX: until no process holds memory on that GPU (a restarted server needs its 80 % back)
wait_gpu_free() {
  command -v nvidia-smi > /dev/null || return 0
  for _ in $(seq 1 60); do
    used=$(nvidia-smi -i "$1" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | tr -d ' ')
    [ -n "$used" ] && [ "$used" -lt 4000 ] && return 0
    sleep 1
  done
  say "GPU $1 still holds ${used} MiB"
}

# wait_up TIMEOUT NAME...: every named process answers /health; fails fast if one dies or logs a traceback
wait_up() {
  local timeout=$1; shift
  local t0=$SECONDS name url log left=$((${DEADLINE:-565} - SECONDS - 30))
  [ "$timeout" -gt "$left" ] && timeout=$left
  while :; do
    local up=0
    for name in "$@"; do
      log=$(cat "$RUN/$name.log")
      if ! running "$name" || grep -qs "SIGQUIT\|Scheduler hit an exception\|refusing to start" "$log"; then
        say "$name FAILED to start; tail of $log:"; tail -40 "$log"; return 1
      fi
      url=$(url_of "$name")
      [ "$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$url/health")" = 200 ] && up=$((up + 1))
    done
    [ "$up" = $# ] && { say "up after $((SECONDS - t0)) s: $*"; return 0; }
    [ $((SECONDS - t0)) -ge "$timeout" ] && { say "not up after $timeout s: $*"; for name in "$@"; do tail -15 "$(cat "$RUN/$name.log")"; done; return 1; }
    sleep 1
  done
}

url_of() {
  case $1 in prefill-0) echo $P ;; decode-0) echo $D ;; colocated-0) echo $S ;; router) echo $R ;;
    sglang-router) echo http://127.0.0.1:8100 ;; mini-lb) echo http://127.0.0.1:8200 ;;
    router-before) echo http://127.0.0.1:8300 ;; esac
}

# bg NAME CMD...: any other long-lived process (sglang-router) in its own session
bg() {
  local name=$1; shift
  local log=$LOGS/$name.log
  setsid nohup "$@" > "$log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"; echo "$log" > "$RUN/$name.log"
  say "started $name (pid $!): $*"
}

# step NAME LIMIT CMD...: one measurement, at most LIMIT seconds and never past the call's DEADLINE (seconds since the
# script started; the device call's own limit is 600 s and collect must still run); output also in $LOGS/NAME.out
DEADLINE=${DEADLINE:-565}
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 15))
  if [ "$left" -lt 15 ]; then say "step $name skipped: ${left}s left"; echo "$name skipped" >> "$RUN/steps.txt"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "step $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.out"
  local rc=${PIPESTATUS[0]}
  say "step $name rc=$rc"
  echo "$name rc=$rc" >> "$RUN/steps.txt"
  return 0
}

# collect TAG: everything under /root/run (logs, results, step codes) into $OUT/TAG.tgz, plus a short summary
collect() {
  local tag=$1
  [ -n "${OUT:-}" ] || { say "no \$OUT: nothing collected"; return 0; }
  nvidia-smi > "$LOGS/nvidia-smi.$tag.txt" 2>&1 || true
  local base; base=$(basename "$RUN")
  tar -czf "$OUT/$tag.tgz" -C "$(dirname "$RUN")" "$base" 2>/dev/null
  if [ "$(stat -c %s "$OUT/$tag.tgz")" -gt $((15 * 1024 * 1024)) ]; then  # keep under the 16 MiB a file may be
    tar -czf "$OUT/$tag.tgz" -C "$(dirname "$RUN")" "$base/results" "$base/steps.txt" 2>/dev/null
    for f in "$LOGS"/*.log; do tail -c 300000 "$f" > "$f.tail"; done
    (cd "$(dirname "$RUN")" && tar -czf "$OUT/$tag-logtails.tgz" "$base"/logs/*.tail) || true
  fi
  { cat "$RUN/steps.txt" 2>/dev/null; grep -h "ppd.sglang.ext" "$LOGS"/decode-0.*.log 2>/dev/null | sort | uniq -c | head; } \
    > "$OUT/$tag-summary.txt"
  say "collected $OUT/$tag.tgz ($(du -h "$OUT/$tag.tgz" | cut -f1))"
}

# restart_pd_tcp: the PD pair restarted with KV over Mooncake TCP (MC_FORCE_TCP=1), the decode server with our local
# appends, and the router told link.kind=mooncake-tcp (so `auto` prices the slow link and skips the NVLink fit)
restart_pd_tcp() {
  for name in router prefill-0 decode-0; do stop $name; done
  wait_gpu_free 0
  wait_gpu_free 1
  start prefill-0 --set sglang.transport=tcp
  start decode-0 --set sglang.transport=tcp --set sglang.decode_local_append=true
  wait_up 240 prefill-0 decode-0 || return 1
  start router --set router.policy=auto --set sglang.decode_local_append=true --set sglang.transport=tcp \
    --set link.kind=mooncake-tcp
  wait_up 90 router
}

# router_compare: sglang-router 0.3.2 (Rust) and its mini-lb in front of the running PD pair, our router (forced
# `prefill` by header) against both: same tokens, TTFT p50/mean and the per-round paired difference (RC_REPS rounds,
# 9 unless set; RC_ORDER=shuffle for a fresh order each round; RC_LENGTHS, 512,2048,8192 unless set; RC_LIMIT, the
# step's limit in s, 300 unless set; RC_SEED, the prompts' seed, 2 unless set)
router_compare() {
  bg sglang-router python3 -m sglang_router.launch_router --pd-disaggregation --prefill "$P" "$BP" --decode "$D" \
    --host 127.0.0.1 --port 8100
  bg mini-lb python3 -m sglang_router.launch_router --pd-disaggregation --mini-lb --prefill "$P" "$BP" --decode "$D" \
    --host 127.0.0.1 --port 8200
  local before=() up=(sglang-router mini-lb)
  if [ -d "$REPO/.gpu-stage/before/router" ]; then
    # an earlier build of our router (carried as .gpu-stage/before: its ppd, router, launch, configs), with the same
    # config and sets as ours, on port 8300: timed alongside, ours minus it is what the change did on this box
    (cd "$REPO/.gpu-stage/before" && PYTHONPATH=/root/site:$PWD bg router-before python3 -m router \
      --config "$PPD_CFG" "${BASE_SETS[@]}" $(cat "$RUN/router.sets" 2>/dev/null) --set router.port=8300)
    before=(--ours-before http://127.0.0.1:8300)
    up+=(router-before)
  fi
  wait_up 45 "${up[@]}" || say "a reference router is not up (its rows will show errors)"
  step router_compare "${RC_LIMIT:-300}" python3 -m experiments.gpu_router_compare --prefill "$P" --decode "$D" --ours "$R" \
    --sglang http://127.0.0.1:8100 --mini-lb http://127.0.0.1:8200 "${before[@]}" --lengths "${RC_LENGTHS:-512,2048,8192}" \
    --reps "${RC_REPS:-9}" --order "${RC_ORDER:-rotate}" --seed "${RC_SEED:-2}" --warmup 2 --out "$RES/router_compare.json"
  stop sglang-router
  stop mini-lb
  stop router-before
}
