"""Fixtures that start the embedded stack (emulated prefill + decode servers and the router) on free loopback ports.

    def test_chat(embedded_stack):
        stack = embedded_stack()                              # shared for the session: policy from configs/local.yaml
        stack = embedded_stack(policy="prefill")              # another shared stack, router.policy=prefill
        stack = embedded_stack(extra_overrides=["emulator.time_scale=0.1"], fresh=True)  # private: yours to break
        httpx.post(stack.router_url + "/v1/chat/completions", json=...)
        stack.prefill_urls[0], stack.decode_urls[0]           # the backends, for direct calls

    def test_simple(router_url): ...                          # the default shared stack's router URL

Shared stacks live for the whole session (a start costs seconds on the 2-core box); a test that kills a backend or
changes server state for good asks for `fresh=True` and gets a stack stopped at the end of the session (or earlier
with `stack.stop()`). Per-request policy: the `x-ppd-policy` header works on any stack.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence

import pytest

from launch.supervisor import Stack, free_ports, start_stack
from ppd.config import REPO_ROOT, load_config

LOCAL_CONFIG = REPO_ROOT / "configs" / "local.yaml"
_ENTRY_POINTS = (REPO_ROOT / "ppd" / "emulator" / "__main__.py", REPO_ROOT / "router" / "__main__.py")


def port_overrides(config: str | pathlib.Path = LOCAL_CONFIG, base_overrides: Sequence[str] = ()) -> list[str]:
    """--set overrides that move every listening port of the config (servers, bootstrap, router) to a free one."""
    cfg = load_config(config, list(base_overrides))
    names = [f"{role}.{i}.port" for role in ("prefill", "decode", "colocated") for i in range(len(getattr(cfg, role)))]
    names += [f"prefill.{i}.bootstrap_port" for i in range(len(cfg.prefill))] + ["router.port"]
    return [f"{name}={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]


def embedded_stack_ready() -> str | None:
    """Why the embedded stack cannot start yet (an entry point missing), or None."""
    missing = [str(p.relative_to(REPO_ROOT)) for p in _ENTRY_POINTS if not p.exists()]
    return f"not written yet: {', '.join(missing)}" if missing else None


StackFactory = Callable[..., Stack]


@pytest.fixture(scope="session")
def embedded_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """Factory: `embedded_stack(policy=None, extra_overrides=(), config=configs/local.yaml, fresh=False) -> Stack`."""
    shared: dict[tuple, Stack] = {}
    started: list[Stack] = []

    def factory(
        policy: str | None = None,
        extra_overrides: Sequence[str] = (),
        config: str | pathlib.Path = LOCAL_CONFIG,
        fresh: bool = False,
        ready_timeout_s: float | None = None,
    ) -> Stack:
        reason = embedded_stack_ready()
        if reason:
            pytest.skip(reason)
        key = (str(config), policy, tuple(extra_overrides))
        if not fresh and key in shared and shared[key].alive():
            return shared[key]
        overrides = ([f"router.policy={policy}"] if policy else []) + list(extra_overrides)
        overrides += port_overrides(config, overrides)  # after the caller's: they may add servers
        log_dir = tmp_path_factory.mktemp(f"stack-{policy or 'default'}")
        stack = start_stack(config, overrides=overrides, log_dir=log_dir, ready_timeout_s=ready_timeout_s)
        started.append(stack)
        if not fresh:
            shared[key] = stack
        return stack

    yield factory
    for stack in reversed(started):
        stack.stop()


@pytest.fixture(scope="session")
def default_stack(embedded_stack: StackFactory) -> Stack:
    return embedded_stack()


@pytest.fixture(scope="session")
def router_url(default_stack: Stack) -> str:
    """Base URL of the default shared embedded stack's router (OpenAI base_url = router_url + '/v1')."""
    return default_stack.router_url
