"""Stack configuration: frozen dataclasses inside, validated from YAML by pydantic at the edge.

`load_config(path)` returns a `StackConfig`; a bad file raises `ConfigError` naming the bad field
(e.g. `router.port: Input should be a valid integer`). Command-line overrides use the same dotted names
(`--set router.policy=decode`), generated from the dataclasses by `ppd.flags`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

_STRICT = ConfigDict(extra="forbid")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the field."""


@dataclass(frozen=True)
class ServerConfig:
    """One SGLang (or emulated) server."""

    __pydantic_config__ = _STRICT
    port: int
    host: str = "127.0.0.1"
    bootstrap_port: int | None = None  # prefill servers: SGLang's --disaggregation-bootstrap-port
    gpu: str = "h200"  # hardware spec name (ppd.specs.GPUS): emulator physics and cost model
    gpu_ids: tuple[int, ...] = ()  # CUDA devices for a real SGLang server (CUDA_VISIBLE_DEVICES)
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ModelConfig:
    __pydantic_config__ = _STRICT
    spec: str = "llama-3-8b"  # ppd.specs.MODELS name: layers, heads, KV size for physics and cost model
    served_name: str = "llama-3-8b"  # the id clients pass as `model`
    path: str = "configs/models/llama-3-8b"  # HF-style directory (config.json; tokenizer.json if it has one)
    tokenizer: str = "builtin"  # "builtin" = ppd/assets/tokenizer.json, else a directory with tokenizer.json
    context_length: int = 32768  # longest prompt + max_tokens the router admits


@dataclass(frozen=True)
class LinkConfig:
    __pydantic_config__ = _STRICT
    kind: str = "nvlink"  # ppd.specs.LINKS name, the KV path between prefill and decode GPUs
    gbytes_per_s: float | None = None  # override the spec's effective bandwidth


@dataclass(frozen=True)
class EmulatorConfig:
    """Emulated SGLang servers for machines with no GPU."""

    __pydantic_config__ = _STRICT
    time_scale: float = 1.0  # 2.0 = the emulated GPU runs twice as slow as the real one (wall clock)
    kv_bytes_scale: int = 1024  # real KV bytes are divided by this before they move over Mooncake
    chunk_size: int = 8192  # chunked prefill size, tokens
    max_running_requests: int = 256
    kv_capacity_tokens: int = 0  # 0 = derive from the GPU's memory minus weights
    mem_fraction_static: float = 0.8
    seed: int = 0
    # PD: a half whose peer never shows up is aborted (SGLANG_DISAGGREGATION_*_TIMEOUT)
    waiting_timeout_s: float = 300.0


@dataclass(frozen=True)
class SGLangConfig:
    """Real SGLang servers on GPUs (the `[gpu]` extra)."""

    __pydantic_config__ = _STRICT
    version: str = "0.5.10.post1"  # the only version our decode-side extension is validated against
    transport: Literal["nvlink", "tcp"] = "nvlink"  # Mooncake path for KV on a host without RDMA NICs
    load_format: str = "dummy"  # "dummy": real latencies, random weights (no hub here); "auto" with real weights
    attention_backend: str = "triton"
    sampling_backend: str = "pytorch"
    mem_fraction_static: float = 0.8
    chunked_prefill_size: int = 8192
    decode_local_append: bool = False  # load ppd.sglang.ext on decode servers (the D-route on real SGLang)
    # stream chunks carry only the new output ids (SGLang's default resends all of them in every chunk: a 4k-token
    # stream then costs the server and the router O(n^2) JSON; the router reads either form). The emulator follows it.
    incremental_streaming_output: bool = True
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RouterConfig:
    __pydantic_config__ = _STRICT
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "auto"  # prefill | decode | auto | threshold
    policy_params: dict[str, Any] = field(default_factory=dict)
    max_inflight_per_backend: int = 256  # admission control: beyond it, 429 with Retry-After
    max_inflight_total: int = 1024
    connect_timeout_s: float = 5.0
    first_token_timeout_s: float = 120.0
    inter_token_timeout_s: float = 30.0
    health_interval_s: float = 2.0
    metrics_poll_interval_s: float = 0.5  # backend /metrics polling for queue and running counts
    calibration_path: str | None = None  # persisted online calibration (JSON); None = in memory only
    log_decisions: bool = True


@dataclass(frozen=True)
class StackConfig:
    __pydantic_config__ = _STRICT
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    backend: Literal["emulated", "sglang"] = "emulated"
    model: ModelConfig = field(default_factory=ModelConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    prefill: tuple[ServerConfig, ...] = ()
    decode: tuple[ServerConfig, ...] = ()
    colocated: tuple[ServerConfig, ...] = ()  # mode: colocated — normal servers doing prefill and decode
    router: RouterConfig = field(default_factory=RouterConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def __post_init__(self) -> None:
        if self.mode == "disaggregated" and (not self.prefill or not self.decode):
            raise ValueError("mode disaggregated needs at least one prefill and one decode server")
        if self.mode == "colocated" and not self.colocated:
            raise ValueError("mode colocated needs at least one server under `colocated`")
        for i, s in enumerate(self.prefill):
            if s.bootstrap_port is None:
                raise ValueError(f"prefill.{i}.bootstrap_port: required for a prefill server (port {s.port})")

    @property
    def servers(self) -> tuple[ServerConfig, ...]:
        return self.prefill + self.decode + self.colocated


_ADAPTER = TypeAdapter(StackConfig)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> StackConfig:
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_errors(err)}") from None


def load_config(path: str | pathlib.Path, overrides: list[str] | None = None) -> StackConfig:
    """Read a YAML stack config; `overrides` are `dotted.key=value` strings (YAML-typed values)."""
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        apply_override(data, item)
    return parse_config(data, str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a raw config dict; list entries are addressed by index (`decode.0.port=31001`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw)
    node: Any = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict of any config dataclass (for results files and /ppd/model)."""
    return dataclasses.asdict(cfg)


def resolve_path(path: str) -> pathlib.Path:
    """Config paths are relative to the repository root unless absolute."""
    p = pathlib.Path(path)
    return p if p.is_absolute() else REPO_ROOT / p
