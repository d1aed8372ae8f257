"""The edge publisher's retries back off with jitter (#19 item 7): before, every edge of a
fleet waited exactly 0.5, 1, 2 s after a broker outage and retried in lockstep."""

from __future__ import annotations

from typing import Any

import nats.errors
import pytest

import edge_runtime.publisher as publisher_module
from edge_runtime.publisher import UpdatePublisher
from fedcore.errors import TransportError


async def delays_of(rand: float, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(publisher_module.asyncio, "sleep", sleep)
    publisher = UpdatePublisher(
        None,  # type: ignore[arg-type]  # never reached: the call fails first
        max_payload=1024,
        attempts=4,
        backoff_s=0.5,
        rand=lambda: rand,
    )

    async def outage() -> Any:
        raise nats.errors.TimeoutError

    with pytest.raises(TransportError, match="failed 4 times"):
        await publisher._retry("publish", outage, "u1")
    return slept


async def test_retries_double_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    low = await delays_of(0.0, monkeypatch)
    high = await delays_of(1.0, monkeypatch)
    middle = await delays_of(0.5, monkeypatch)
    assert middle == pytest.approx([0.5, 1.0, 2.0])  # no jitter at the midpoint
    assert low == pytest.approx([0.25, 0.5, 1.0])  # two edges drawing differently ...
    assert high == pytest.approx([0.75, 1.5, 3.0])  # ... retry at different times
