"""Emulated SGLang 0.5.10.post1 servers (PD prefill, PD decode with local append, colocated) for machines with no GPU.

    python -m ppd.emulator --config configs/local.yaml --role prefill|decode|colocated --index 0 [--set k=v ...]

- Timing: one asyncio task per server is its GPU (engine.py): continuous batching on ppd.roofline time for the
  server's `gpu` and the config's `model.spec`, x `emulator.time_scale` of wall clock.
- KV really moves: a P-route request's KV (kv_bytes / `emulator.kv_bytes_scale`) is written prefill -> decode with
  Mooncake's TransferEngine over TCP (transfer.py); the move takes max(measured write, link model of the real KV size).
- Tokens come from the KV bytes a server holds (kvdata.py): identical by P-route, D-route and colocated; a corrupted
  transfer changes them and counts in `ppd_emulator_kv_integrity_errors_total`.
- `meta_info.ppd` (final chunk / response) holds the server's timings in emulated-GPU ms (wall ms / time_scale).

Knobs (config `emulator.*`): time_scale, kv_bytes_scale, chunk_size, max_running_requests, kv_capacity_tokens (0 =
from GPU memory), mem_fraction_static, seed, waiting_timeout_s (a PD half whose peer never comes is aborted, SGLang's
300 s). Test only: env PPD_EMULATOR_FLIP_KV_BYTE=1 on a prefill server flips one byte of every KV buffer it sends.
"""
