"""FirstTokenWait (router/pd.py): the wait for the first token runs in the request's own task, cancelled at the
deadline or when the prefill half fails; whichever way it ends, no cancel request is left behind on the task."""

from __future__ import annotations

import asyncio

import pytest

from router.pd import FirstTokenWait, PrefillFailed


def _no_cancel_left() -> None:
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def _fails_after(delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    raise PrefillFailed("http://prefill", "HTTP 500: boom", status=500)


async def test_deadline_raises_timeout_error():
    loop = asyncio.get_running_loop()
    wait = FirstTokenWait(loop.time() + 0.05, None)
    with pytest.raises(TimeoutError):
        async with wait:
            await asyncio.sleep(5)
    _no_cancel_left()
    await asyncio.sleep(0)  # nothing pending


async def test_prefill_failure_ends_the_wait_with_its_error():
    loop = asyncio.get_running_loop()
    prefill = asyncio.create_task(_fails_after(0.02))
    t0 = loop.time()
    with pytest.raises(PrefillFailed, match="boom"):
        async with FirstTokenWait(t0 + 5, prefill):
            await asyncio.sleep(5)
    assert loop.time() - t0 < 1
    _no_cancel_left()


async def test_prefill_that_failed_before_the_wait_raises_at_once():
    prefill = asyncio.create_task(_fails_after(0))
    await asyncio.wait({prefill})
    with pytest.raises(PrefillFailed):
        async with FirstTokenWait(asyncio.get_running_loop().time() + 5, prefill):
            raise AssertionError("not reached")


async def test_cancelled_prefill_is_a_prefill_failure():
    prefill = asyncio.create_task(asyncio.sleep(5))
    asyncio.get_running_loop().call_later(0.02, prefill.cancel)
    with pytest.raises(PrefillFailed, match="cancelled"):
        async with FirstTokenWait(asyncio.get_running_loop().time() + 5, prefill):
            await asyncio.sleep(5)


async def test_prefill_that_succeeds_does_not_interrupt():
    prefill = asyncio.create_task(asyncio.sleep(0.01))
    wait = FirstTokenWait(asyncio.get_running_loop().time() + 5, prefill)
    async with wait:
        await asyncio.sleep(0.05)  # the prefill half finished meanwhile, fine
    async with wait:  # entered again, as for each read before the first token
        await asyncio.sleep(0.01)
    _no_cancel_left()


async def test_cancel_that_lands_as_the_await_finishes_is_taken_back():
    """The deadline passes in the very turn the awaited read completes: the read's result stands, and the cancel
    that was requested must not hit the next await."""
    wait = FirstTokenWait(asyncio.get_running_loop().time() + 5, None)
    async with wait:
        wait._fire("timeout")  # as the timer would, with nothing left to await in the block
    await asyncio.sleep(0.01)  # would raise CancelledError if the cancel were still pending
    _no_cancel_left()
