#!/usr/bin/env bash
# On the GPU box: keep one staged chunk (carried in this call as .gpu-stage/NN) under /root/stage.
#   bash scripts/gpu/receive.sh NN
# Chunks are kept as separate files, so a call that is repeated (a transfer that broke off) does no harm;
# setup.sh reassembles them in order and checks the bundle's sha256.
set -euo pipefail
n=${1:?usage: receive.sh NN}
src=.gpu-stage/$n
[ -d "$src" ] || { echo "receive: $src was not carried into this call (carry: [\"$src\"])" >&2; exit 1; }
mkdir -p /root/stage
cp "$src"/chunk_* /root/stage/
[ -f "$src/bundle.sha256" ] && cp "$src/bundle.sha256" /root/stage/
echo "receive: chunk $n kept; /root/stage now holds: $(cd /root/stage && ls | tr '\n' ' ')($(du -sh /root/stage | cut -f1))"
