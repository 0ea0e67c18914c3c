"""Emulated SGLang 0.5.10.post1 servers (prefill, decode with local append, colocated) for machines with no GPU.

Timing comes from the roofline of a named GPU and model (ppd.roofline), KV moves for real over Mooncake TCP, and the
output tokens are derived from the KV bytes a server holds. Entry point: `python -m ppd.emulator` (see __main__.py).
"""
