"""Command lines and environment of real SGLang 0.5.10.post1 servers, built from the stack config.

These are the flags and Mooncake settings seen working on the 2 x H200 box (../shared/gpu/NOTES.md, kit/servers.sh):
dummy weights with the model's architecture config, no tokenizer (the router sends token ids), triton attention,
Mooncake for KV. Each flag comes from one config field; nothing here is repeated elsewhere.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Literal

from ppd.config import ConfigError, ServerConfig, StackConfig, resolve_path

Role = Literal["prefill", "decode", "colocated"]

# Our wrapper around sglang.launch_server: same flags, keeps the radix cache on a decode server and adds local appends.
LOCAL_APPEND_LAUNCHER = "ppd.sglang.ext.launch_server"
SGLANG_LAUNCHER = "sglang.launch_server"

# SGLang hard-codes Mooncake's RDMA protocol; a host without RDMA NICs needs one of these (NOTES.md, "PD with Mooncake").
TRANSPORT_ENV: dict[str, dict[str, str]] = {
    "nvlink": {"MC_INTRANODE_NVLINK": "1", "SGLANG_MOONCAKE_SEND_AUX_TCP": "1"},  # KV over NVLink, aux data over TCP
    "tcp": {"MC_FORCE_TCP": "1"},
}
# NVLink multicast (NVLS) is off on the lent machines and breaks NCCL/symmetric-memory init there.
ALWAYS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def model_dir(cfg: StackConfig) -> pathlib.Path:
    """model.path resolved against the repo root; it must hold an HF config.json (weights only if load_format != dummy)."""
    path = resolve_path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a directory holding config.json")
    return path


def launcher_module(cfg: StackConfig, role: Role) -> str:
    if role == "decode" and cfg.sglang.decode_local_append:
        return LOCAL_APPEND_LAUNCHER
    return SGLANG_LAUNCHER


def server_argv(cfg: StackConfig, server: ServerConfig, role: Role, python: str = sys.executable) -> list[str]:
    sg = cfg.sglang
    argv = [python, "-m", launcher_module(cfg, role)]
    argv += ["--model-path", str(model_dir(cfg))]
    argv += ["--load-format", sg.load_format]
    argv += ["--skip-tokenizer-init"]  # the router tokenizes and sends input_ids
    argv += ["--enable-metrics"]  # the router polls /metrics for running/queued requests (the cost model's load)
    if sg.incremental_streaming_output:
        argv += ["--incremental-streaming-output"]
    argv += ["--attention-backend", sg.attention_backend]
    argv += ["--sampling-backend", sg.sampling_backend]
    argv += ["--mem-fraction-static", str(sg.mem_fraction_static)]
    argv += ["--chunked-prefill-size", str(sg.chunked_prefill_size)]
    argv += ["--host", server.host, "--port", str(server.port)]
    if role != "colocated":  # a colocated server is plain SGLang: no disaggregation, radix cache on (the default)
        argv += ["--disaggregation-mode", role, "--disaggregation-transfer-backend", "mooncake"]
        if role == "prefill":
            if server.bootstrap_port is None:
                raise ConfigError(f"prefill server on port {server.port}: bootstrap_port is required")
            argv += ["--disaggregation-bootstrap-port", str(server.bootstrap_port)]
    argv += list(sg.extra_args) + list(server.extra_args)  # last: a later flag overrides an earlier one in argparse
    return argv


def server_env(cfg: StackConfig, server: ServerConfig, role: Role) -> dict[str, str]:
    env = dict(ALWAYS_ENV)
    if role != "colocated":
        env.update(TRANSPORT_ENV[cfg.sglang.transport])
    if server.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in server.gpu_ids)
    env.update(cfg.sglang.env)
    return env
