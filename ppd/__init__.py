"""P-PD: cache-rate-aware routing of append-prefills between SGLang prefill and decode servers."""

__version__ = "0.1.0"
