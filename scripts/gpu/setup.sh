#!/usr/bin/env bash
# On the GPU box, after receive.sh kept every chunk: reassemble and check the bundle, install it into /root/site,
# and check that what the stack imports is there (sglang 0.5.10.post1 with the validated source for our extension,
# the slimmed kernel, Mooncake for CUDA 13, sglang-router, the router's web stack, the openai client).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd /root/stage
[ -f bundle.sha256 ] || { echo "setup: bundle.sha256 missing: the last chunk was not received" >&2; exit 1; }
cat $(ls chunk_* | sort) > bundle.tar
got=$(sha256sum bundle.tar | cut -d' ' -f1)
[ "$got" = "$(cat bundle.sha256)" ] || { echo "setup: bundle sha256 $got != $(cat bundle.sha256) (chunks: $(ls chunk_*))" >&2; exit 1; }
rm -rf b && mkdir b && tar -xf bundle.tar -C b
say "installing $(ls b/wheels | wc -l) wheels into /root/site"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/site b/wheels/*.whl 2>&1 | grep -v "^WARNING: Target directory" | tail -3 || true
cp -r b/kernel/* /root/site/
# wheels added after the bundle was staged, carried beside its last chunk (`carry: [".gpu-stage/05", ".gpu-stage/extra"]`)
if compgen -G "$REPO/.gpu-stage/extra/*.whl" > /dev/null; then
  say "installing the extra wheels: $(cd "$REPO/.gpu-stage/extra" && ls *.whl | tr '\n' ' ')"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/site "$REPO"/.gpu-stage/extra/*.whl 2>&1 | grep -v "^WARNING: Target directory" | tail -3 || true
fi
cp b/MANIFEST "$RUN/bundle-MANIFEST.txt"
cd "$REPO"
python3 - <<'PY' 2>&1 | tee "$RUN/versions.txt"
import importlib, importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for mod in ("sglang", "sgl_kernel", "triton", "transformers", "tokenizers", "mooncake", "sglang_router", "fastapi",
            "uvicorn", "httptools", "uvloop", "aiohttp", "pydantic", "zmq", "orjson", "openai", "httpx", "prometheus_client", "yaml", "jinja2"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:18s} {getattr(m, '__version__', '')}")
    except Exception as e:
        print(f"{mod:18s} IMPORT FAILED: {e!r}")
for dist in ("mooncake-transfer-engine-cuda13", "sglang-router", "flashinfer-python"):
    print(f"{dist:32s} {md.version(dist)}")
from ppd.sglang.ext.install import verify_sglang
print("ppd.sglang.ext: sglang source verified at", verify_sglang())
for mod in ("ppd.cli", "launch.cli", "router.app", "experiments.sweep_cli", "experiments.gpu_common"):
    try:
        importlib.import_module(mod)
        print(f"{mod:18s} ok")
    except Exception as e:  # a missing dependency of ours: the blocks would all fail, say it now
        print(f"{mod:18s} IMPORT FAILED: {e!r}")
from ppd.cli import build_parser
build_parser()
print("ppd.cli subcommands ok")
PY
nvidia-smi topo -m > "$LOGS/topo.txt" 2>&1 || true
grep -q "IMPORT FAILED" "$RUN/versions.txt" && { echo "setup: an import failed (above)" >&2; exit 1; }
say "setup done"
