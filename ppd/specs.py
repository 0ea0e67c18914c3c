"""Hardware and model specifications: plain frozen data, looked up by name.

Peak numbers are vendor datasheet values (dense bf16, no sparsity). The achieved fraction of each peak is a property of
the serving kernels, not of the chip; it lives in `KernelEfficiency` and was fitted to measurements on H200 with
SGLang 0.5.10.post1's triton attention backend (../shared/gpu/NOTES.md, tables "Seen"). Other GPUs reuse the same
efficiencies scaled by their own peaks, which is the assumption the emulator and the cost model both make.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float  # dense peak, TFLOP/s
    hbm_tbps: float  # peak HBM bandwidth, TB/s
    hbm_gib: float  # memory capacity, GiB
    num_sms: int

    @property
    def flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_context: int
    dtype_bytes: int = 2  # bf16 weights and KV

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes (Llama-3-8B bf16: 128 KiB)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def params_per_layer(self) -> int:
        q_out = self.heads * self.head_dim
        kv_out = 2 * self.kv_heads * self.head_dim
        attn = self.hidden * (q_out + kv_out) + q_out * self.hidden
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU)
        return attn + mlp

    @property
    def params_non_embedding(self) -> int:
        """Parameters every token goes through in the transformer stack (no embedding, no LM head)."""
        return self.layers * self.params_per_layer

    @property
    def params_total(self) -> int:
        return self.params_non_embedding + 2 * self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        """Bytes a decode step reads: the stack plus the LM head (embedding lookups are negligible)."""
        return (self.params_non_embedding + self.vocab * self.hidden) * self.dtype_bytes


@dataclass(frozen=True)
class LinkSpec:
    """The KV path between a prefill and a decode GPU."""

    name: str
    gbytes_per_s: float  # effective payload bandwidth, GB/s
    latency_ms: float  # per-transfer fixed cost (handshake, bootstrap, aux data)

    @property
    def bytes_per_s(self) -> float:
        return self.gbytes_per_s * 1e9


@dataclass(frozen=True)
class KernelEfficiency:
    """Achieved fraction of peak for each kernel family, plus fixed costs.

    Fitted to the H200 measurements with SGLang 0.5.10.post1's triton attention backend (NOTES.md "Seen" tables) by
    experiments/emulator_vs_gpu.py; see ppd/roofline.py for how each term enters.
    """

    linear_mfu: float = 0.85  # GEMMs of a prefill chunk (bounded below by reading the weights once)
    attn_causal_mfu: float = 0.18  # attention among the new tokens (dense, causal)
    attn_prefix_mfu: float = 0.15  # new tokens attending to the cached prefix (paged gather)
    extend_prefix_bw_frac: float = 0.0165  # floor: prefix KV streamed by the extend kernel's few CTAs when m is small
    decode_bw_frac: float = 0.80  # weights + KV streamed by a decode step (and weights by a small prefill)
    decode_step_overhead_ms: float = 1.1  # launch/sampling/scheduler cost per decode step
    prefill_overhead_ms: float = 0.5  # per prefill forward
    request_overhead_ms: float = 21.0  # HTTP, tokenizer manager, scheduler hops around one request
    per_token_overhead_us: float = 1.55  # the same, per prompt token (JSON of input_ids, host-side copies)
    # PD decode side: when a transferred request joins the running batch, the decode GPU stalls for a fixed cost plus
    # the KV landing in its HBM (others' max gap under the P-route); the request's own first token is not delayed.
    kv_landing_overhead_ms: float = 0.5
    kv_landing_bw_frac: float = 0.04


GPUS: dict[str, GpuSpec] = {
    "h200": GpuSpec("h200", bf16_tflops=989.0, hbm_tbps=4.8, hbm_gib=141.0, num_sms=132),
    "h100": GpuSpec("h100", bf16_tflops=989.0, hbm_tbps=3.35, hbm_gib=80.0, num_sms=132),
    "a100": GpuSpec("a100", bf16_tflops=312.0, hbm_tbps=2.0, hbm_gib=80.0, num_sms=108),
    "h20": GpuSpec("h20", bf16_tflops=148.0, hbm_tbps=4.0, hbm_gib=96.0, num_sms=78),
}

MODELS: dict[str, ModelSpec] = {
    "llama-3-8b": ModelSpec(
        "llama-3-8b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=14336,
        vocab=128256,
        max_context=131072,
    ),
    "qwen2.5-14b": ModelSpec(
        "qwen2.5-14b",
        layers=48,
        hidden=5120,
        heads=40,
        kv_heads=8,
        head_dim=128,
        intermediate=13824,
        vocab=152064,
        max_context=131072,
    ),
    "phi-3-mini": ModelSpec(
        "phi-3-mini",
        layers=32,
        hidden=3072,
        heads=32,
        kv_heads=32,
        head_dim=96,
        intermediate=8192,
        vocab=32064,
        max_context=131072,
    ),
}

# Effective payload bandwidth for KV. nvlink: what Mooncake's intra-node NVLink path reached between the two H200s
# of the lent box (results/h200x2: 1 GB in 5.8-7.7 ms, 128 MB in 3-5 ms -> ~150 GB/s + ~3 ms), far below NV18's
# ~450 GB/s peak. RDMA/TCP classes: line rate. mooncake-tcp: Mooncake's TCP transport on that box (median 1.6 GB/s).
LINKS: dict[str, LinkSpec] = {
    # Mooncake NVLink, measured 2xH200 (results/h200x2)
    "nvlink": LinkSpec("nvlink", gbytes_per_s=150.0, latency_ms=3.0),
    "rdma-400g": LinkSpec("rdma-400g", gbytes_per_s=50.0, latency_ms=2.0),
    "rdma-100g": LinkSpec("rdma-100g", gbytes_per_s=12.5, latency_ms=2.0),
    "tcp-25g": LinkSpec("tcp-25g", gbytes_per_s=3.125, latency_ms=5.0),
    "mooncake-tcp": LinkSpec("mooncake-tcp", gbytes_per_s=1.6, latency_ms=5.0),  # measured on 2xH200 (results/h200x2)
}


def _lookup(table: dict, name: str, what: str):
    key = name.lower()
    if key not in table:
        raise KeyError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[key]


def gpu(name: str) -> GpuSpec:
    return _lookup(GPUS, name, "GPU")


def model(name: str) -> ModelSpec:
    return _lookup(MODELS, name, "model")


def link(name: str) -> LinkSpec:
    return _lookup(LINKS, name, "link")


def model_from_hf_config(name: str, cfg: dict) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json (architecture only; no weights needed)."""
    heads = cfg["num_attention_heads"]
    return ModelSpec(
        name=name,
        layers=cfg["num_hidden_layers"],
        hidden=cfg["hidden_size"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim", cfg["hidden_size"] // heads),
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        max_context=cfg.get("max_position_embeddings", 8192),
    )
