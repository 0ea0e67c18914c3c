"""Where an experiment sends its requests: a running router (`--router-url`) or an embedded stack it starts itself
(`--config X [--set k=v]`, started with `launch.supervisor.start_stack` on free ports and stopped afterwards).

`--hardware prefill=h200,decode=h20 --link rdma-400g` become `--set` overrides of every prefill/decode server's
`gpu` and of `link.kind`; `emulator.time_scale` is read back from the config so results are in emulated GPU ms.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ppd import specs
from ppd.config import ConfigError, load_config, to_dict


@dataclass(frozen=True)
class Hardware:
    prefill_gpu: str | None = None
    decode_gpu: str | None = None
    link: str | None = None

    @property
    def given(self) -> bool:
        return any((self.prefill_gpu, self.decode_gpu, self.link))


def parse_hardware(text: str | None, link: str | None) -> Hardware:
    """`prefill=h200,decode=h20` (either side may be left out) and a link class name, checked against ppd.specs."""
    pgpu = dgpu = None
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--hardware {text!r}: expected prefill=GPU,decode=GPU")
        side, name = (s.strip().lower() for s in part.split("=", 1))
        if name not in specs.GPUS:
            raise ValueError(f"--hardware: unknown GPU {name!r}; known: {', '.join(sorted(specs.GPUS))}")
        if side == "prefill":
            pgpu = name
        elif side == "decode":
            dgpu = name
        else:
            raise ValueError(f"--hardware: unknown side {side!r} (prefill or decode)")
    if link is not None and link not in specs.LINKS:
        raise ValueError(f"--link: unknown link {link!r}; known: {', '.join(sorted(specs.LINKS))}")
    return Hardware(pgpu, dgpu, link)


def hardware_overrides(cfg_path: str | pathlib.Path, hw: Hardware, base_overrides: Sequence[str] = ()) -> list[str]:
    cfg = load_config(cfg_path, list(base_overrides))
    out = []
    if hw.prefill_gpu:
        out += [f"prefill.{i}.gpu={hw.prefill_gpu}" for i in range(len(cfg.prefill))]
    if hw.decode_gpu:
        out += [f"decode.{i}.gpu={hw.decode_gpu}" for i in range(len(cfg.decode))]
    if hw.link:
        out.append(f"link.kind={hw.link}")
    return out


def port_overrides(cfg_path: str | pathlib.Path, base_overrides: Sequence[str] = ()) -> list[str]:
    """Move every listening port of the config to a free one, so a sweep can run beside other stacks."""
    from launch.supervisor import free_ports

    cfg = load_config(cfg_path, list(base_overrides))
    need = 1 + 2 * len(cfg.prefill) + len(cfg.decode) + len(cfg.colocated)
    ports = iter(free_ports(need))
    out = [f"router.port={next(ports)}"]
    for i in range(len(cfg.prefill)):
        out += [f"prefill.{i}.port={next(ports)}", f"prefill.{i}.bootstrap_port={next(ports)}"]
    out += [f"decode.{i}.port={next(ports)}" for i in range(len(cfg.decode))]
    out += [f"colocated.{i}.port={next(ports)}" for i in range(len(cfg.colocated))]
    return out


def hardware_label(cfg: dict[str, Any] | None, hw: Hardware) -> str:
    """`h200-h20-rdma-400g`: the pair and link, from the config when known, else from --hardware/--link."""
    pgpu = hw.prefill_gpu or (cfg["prefill"][0]["gpu"] if cfg and cfg.get("prefill") else "unknown")
    dgpu = hw.decode_gpu or (cfg["decode"][0]["gpu"] if cfg and cfg.get("decode") else "unknown")
    link = hw.link or (cfg["link"]["kind"] if cfg else "unknown")
    return f"{pgpu}-{dgpu}-{link}"


@dataclass
class Target:
    router_url: str
    time_scale: float
    config: dict[str, Any] | None = None  # the stack config (when we started it, or --config given)
    overrides: list[str] = field(default_factory=list)
    log_dir: str | None = None
    decode_urls: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_target(
    router_url: str | None,
    config: str | None,
    sets: Sequence[str] = (),
    hw: Hardware = Hardware(),
    time_scale: float | None = None,
    log_dir: str | None = None,
    echo=print,
) -> Iterator[Target]:
    if bool(router_url) == bool(config):
        raise ValueError("give exactly one of --router-url or --config")
    if router_url:
        if hw.given:
            echo("note: --hardware/--link only label the results when --router-url is given (the stack is running)")
        yield Target(router_url.rstrip("/"), time_scale or 1.0)
        return
    from launch.supervisor import start_stack

    overrides = list(sets) + hardware_overrides(config, hw, sets)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        raise ValueError(str(err)) from None
    if time_scale is not None and time_scale != cfg.emulator.time_scale:
        overrides.append(f"emulator.time_scale={time_scale}")
        cfg = load_config(config, overrides)
    all_overrides = overrides + port_overrides(config, overrides)
    echo(f"starting the stack: {config} " + " ".join(f"--set {o}" for o in overrides))
    stack = start_stack(config, overrides=all_overrides, log_dir=log_dir)
    try:
        echo(f"stack up: router {stack.router_url}, logs {stack.log_dir}")
        scale = cfg.emulator.time_scale if cfg.backend == "emulated" else 1.0
        yield Target(stack.router_url, scale, to_dict(cfg), overrides, str(stack.log_dir), stack.decode_urls)
    finally:
        stack.stop()
