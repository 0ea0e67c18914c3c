#!/usr/bin/env bash
# Build the bundle the lent GPU box needs (it cannot reach any registry) and cut it into device-call-sized chunks.
#
#   bash scripts/gpu/stage.sh          (from anywhere; writes <repo>/.gpu-stage/NN/chunk_NN, gitignored)
#
# Bundle: the wheels of scripts/gpu/wheels.txt (sglang 0.5.10.post1 and what the image lacks: fastapi, uvicorn,
# pydantic, pyzmq, orjson, openai, Mooncake for CUDA 13, sglang-router 0.3.2, ...) and sglang-kernel 0.4.4 slimmed to
# what Hopper needs with the triton attention backend (the 1.7 GB FA3 .so, sm100 and flashmla dropped: ~21 MB).
# Not bundled: the repo (every device call carries the working tree) and torch/triton/transformers (the image's).
# Each chunk travels in its own device call (`carry: [".gpu-stage/NN"]`), so chunk + working tree must stay under
# the 64 MiB a call carries: CHUNK_MIB (default 58) is checked against the working tree's size.
# Then on the box, per chunk in order: bash scripts/gpu/receive.sh NN; after the last: bash scripts/gpu/setup.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/scripts/gpu
cd "$root"
out=.gpu-stage
# default chunk size: what the 64 MiB of a call leaves after the working tree, less 6 MiB for the tree's growth
# (files deleted but not yet committed make du complain: ignore them)
tree_size() { git ls-files -co --exclude-standard -z | (du -cb --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1; }
tree_mib=$(( $(tree_size) / 1024 / 1024 ))
CHUNK_MIB=${CHUNK_MIB:-$((64 - tree_mib - 6))}
PY=${PYTHON:-python3}
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_28_x86_64)
say() { echo "[stage +${SECONDS}s] $*"; }

tree_bytes=$(tree_size)
limit=$((64 * 1024 * 1024))
if [ $((tree_bytes + CHUNK_MIB * 1024 * 1024)) -ge $limit ]; then
  echo "[stage] working tree ($((tree_bytes / 1024 / 1024)) MiB) + a ${CHUNK_MIB} MiB chunk exceeds the 64 MiB a device call" \
    "carries: lower CHUNK_MIB or shrink the tree" >&2
  exit 1
fi

if [ "${RECHUNK:-0}" = 1 ] && [ -f "$out/bundle.sha256" ]; then
  # RECHUNK=1: the bundle is already staged (the wheel list unchanged); only cut it again for a grown working tree
  say "re-cutting the staged bundle into ${CHUNK_MIB} MiB chunks"
  cat $(ls "$out"/[0-9]*/chunk_* | sort -t_ -k2) > "$out/bundle.tar"
  [ "$(sha256sum "$out/bundle.tar" | cut -d' ' -f1)" = "$(cat "$out/bundle.sha256")" ] || { echo "[stage] staged chunks do not match bundle.sha256: run without RECHUNK" >&2; exit 1; }
  rm -rf "$out"/[0-9]*
  (cd "$out" && split -b "${CHUNK_MIB}m" -d -a 2 bundle.tar chunk_ && rm bundle.tar)
else
rm -rf "$out"
mkdir -p "$out/bundle/wheels" "$out/bundle/kernel"
say "downloading $(grep -cv '^#' "$here/wheels.txt") wheels for cp312 manylinux x86_64"
"$PY" -m pip download --no-deps "${PLAT[@]}" -d "$out/bundle/wheels" -q -r "$here/wheels.txt"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say "downloading sglang-kernel 0.4.4 (large) and slimming it for Hopper"
"$PY" -m pip download --no-deps "${PLAT[@]}" -d "$tmp" -q sglang-kernel==0.4.4
(cd "$out/bundle/kernel" && "$PY" -m zipfile -e "$tmp"/sglang_kernel-0.4.4-*.whl . &&
  rm -f sgl_kernel/flash_ops.abi3.so sgl_kernel/flashmla_ops* && rm -rf sgl_kernel/sm100)

# what is in it, for the box's setup and for docs/gpu.md
(cd "$out/bundle" && ls wheels > MANIFEST && echo "sglang-kernel 0.4.4 (slimmed): $(du -sh kernel | cut -f1)" >> MANIFEST)
n_wheels=$(ls "$out/bundle/wheels" | wc -l)
expected=$(grep -cv '^#' "$here/wheels.txt")
[ "$n_wheels" = "$expected" ] || { echo "[stage] got $n_wheels wheels, wheels.txt lists $expected" >&2; exit 1; }

say "packing and cutting into ${CHUNK_MIB} MiB chunks"
(cd "$out" && tar -cf bundle.tar -C bundle MANIFEST wheels kernel && rm -rf bundle &&
  sha256sum bundle.tar | cut -d' ' -f1 > bundle.sha256 &&
  split -b "${CHUNK_MIB}m" -d -a 2 bundle.tar chunk_ && rm bundle.tar)
fi
chunks=()
for c in "$out"/chunk_*; do
  n=${c##*_}
  mkdir -p "$out/$n" && mv "$c" "$out/$n/"
  chunks+=("$n")
done
last=${chunks[-1]}
cp "$out/bundle.sha256" "$out/$last/"  # travels with the last chunk: setup.sh checks the reassembled bundle
printf '%s\n' "${chunks[@]}" > "$out/CHUNKS"
say "done: ${#chunks[@]} chunks ($(du -sh "$out" | cut -f1)), sha256 $(cat "$out/bundle.sha256")"
for n in "${chunks[@]}"; do
  echo "  device call: carry [\".gpu-stage/$n\"]  command: bash scripts/gpu/receive.sh $n$([ "$n" = "$last" ] && echo ' && bash scripts/gpu/setup.sh && ...')"
done
