"""Patch (a), main process: keep the radix cache on for a decode-mode server.

SGLang 0.5.10.post1 `ServerArgs._handle_pd_disaggregation` (server_args.py) sets `disable_radix_cache = True` for
`--disaggregation-mode decode` ("KV cache is forced as chunk cache for decode server"). With the chunk cache a
finished request's KV is freed at once; the D-route needs it kept (prompt + generated tokens) so the next turn of
the same conversation finds it. ServerArgs is built (and this runs) in the launcher process, then passed pickled
to the scheduler subprocess, so this one patch is applied before `prepare_server_args` in the main process only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def keep_radix_cache_on_decode(original: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wraps ServerArgs._handle_pd_disaggregation: run it, then give a decode server back the radix-cache choice the
    user made (`--disable-radix-cache` still turns it off; the default is on, as for a normal server)."""

    @functools.wraps(original)
    def _handle_pd_disaggregation(self: Any) -> None:
        requested = self.disable_radix_cache
        original(self)
        if self.disaggregation_mode == "decode" and self.disable_radix_cache != requested:
            self.disable_radix_cache = requested
            log.warning("ppd.sglang.ext: radix cache kept %s on the decode server", "off" if requested else "on")

    _handle_pd_disaggregation.__ppd_patch__ = True  # type: ignore[attr-defined]
    return _handle_pd_disaggregation
