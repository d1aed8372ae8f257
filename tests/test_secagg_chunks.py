"""Secure-aggregation frames in parts (``fedcore.secagg.parts``), without a broker."""

from __future__ import annotations

import asyncio
import os

import pytest

from fedcore.errors import SecAggError
from fedcore.secagg.parts import (
    MESSAGE_ROOM,
    PART_HEAD,
    PartSender,
    Reassembler,
    part_size_for,
    split,
)

MAX = 16 * 1024
LIMIT = 1 << 20


def test_a_frame_that_fits_travels_whole() -> None:
    frame = os.urandom(MAX - MESSAGE_ROOM)
    assert split(frame, MAX) == [frame]
    assert Reassembler().offer("e", frame, max_total=LIMIT, now=0.0) is frame


def test_parts_fit_the_message_and_rebuild_the_frame_in_any_order_with_repeats() -> None:
    frame = os.urandom(5 * MAX + 123)
    parts = split(frame, MAX)
    assert len(parts) == 6 and all(len(p) + MESSAGE_ROOM <= MAX for p in parts)
    assert len(parts[0]) == PART_HEAD + part_size_for(MAX)
    r = Reassembler()
    order = [3, 0, 3, 5, 1, 2, 0]
    assert all(r.offer("e", parts[i], max_total=LIMIT, now=0.0) is None for i in order)
    assert bytes(r.offer("e", parts[4], max_total=LIMIT, now=0.0) or b"") == frame
    assert r.open_bytes == 0


def test_oversize_tampered_and_inconsistent_parts_are_refused() -> None:
    parts = split(os.urandom(3 * MAX), MAX)
    with pytest.raises(SecAggError, match="over"):
        Reassembler().offer("e", parts[0], max_total=2 * MAX, now=0.0)
    r = Reassembler()
    bad = bytearray(parts[1])
    bad[-1] ^= 1
    for part in (parts[0], bad, parts[2], parts[3]):
        try:
            out = r.offer("e", part, max_total=LIMIT, now=0.0)
        except SecAggError as exc:
            assert "digest" in str(exc)
            break
        assert out is None
    else:
        raise AssertionError("a tampered part went through")
    with pytest.raises(SecAggError, match="holds"):
        Reassembler().offer("e", parts[0][:-1], max_total=LIMIT, now=0.0)


def test_at_most_max_open_frames_are_held_and_a_stale_one_gives_way() -> None:
    a, b, c = (split(os.urandom(2 * MAX), MAX) for _ in range(3))
    r = Reassembler(max_open=2, stale_s=10.0)
    assert r.offer("a", a[0], max_total=LIMIT, now=0.0) is None
    assert r.offer("b", b[0], max_total=LIMIT, now=1.0) is None
    assert r.offer("c", c[0], max_total=LIMIT, now=2.0) is None
    assert r.dropped == 1 and r.open_bytes < 2 * 3 * MAX  # two frames in progress, not three
    assert r.offer("c", c[0], max_total=LIMIT, now=20.0) is None  # "a" is stale: evicted
    assert r.dropped == 1
    assert r.offer("b", b[1], max_total=LIMIT, now=21.0) is None  # "b" is held again
    assert r.offer("a", a[1], max_total=LIMIT, now=22.0) is None  # "a" was evicted: dropped
    assert r.dropped == 2


async def test_a_sender_does_not_repeat_a_parted_frame_right_away() -> None:
    sent: list[tuple[str, bytes]] = []
    clock = [0.0]

    async def send(subject: str, data: bytes) -> None:
        await asyncio.sleep(0)
        sent.append((subject, data))

    out = PartSender(send, MAX, repeat_after_s=5.0, clock=lambda: clock[0])
    frame = os.urandom(3 * MAX)
    await asyncio.gather(out.send("s", frame), out.send("s", frame))  # one in flight
    assert len(sent) == 4 and out.skipped == 1
    clock[0] = 1.0
    await out.send("s", frame)  # sent whole a second ago
    assert len(sent) == 4 and out.skipped == 2
    clock[0] = 6.0
    await out.send("s", frame)
    assert len(sent) == 8
    await out.send("s", b"small")  # small frames always go
    await out.send("s", b"small")
    assert len(sent) == 10
    r = Reassembler()
    rebuilt = [r.offer("e", d, max_total=LIMIT, now=0.0) for _, d in sent[:4]]
    assert bytes(rebuilt[-1] or b"") == frame


async def test_a_paced_sender_waits_for_the_receiver_every_window_and_stops_when_busy() -> None:
    sent: list[tuple[str, bytes, bool]] = []
    answers = [b"ok", b"ok"]

    async def send(subject: str, data: bytes) -> None:
        sent.append((subject, data, False))

    async def request(subject: str, data: bytes, timeout_s: float) -> bytes:
        sent.append((subject, data, True))
        return answers.pop(0) if answers else b"busy"

    out = PartSender(send, MAX, request=request, window=4)
    frame = os.urandom(9 * part_size_for(MAX) + 5)  # ten parts
    await out.send("s", frame)
    assert [paced for _, _, paced in sent] == [False, False, False, True] * 2 + [False, True]
    assert out.stopped == 1 and out.last_stop == "busy"  # the last part found it busy
    sent.clear()
    answers[:] = [b"ok", b"ok", b"ok"]
    await out.send("s", frame)  # stopped, so not "sent whole just before": sent again
    assert len(sent) == 10 and out.skipped == 0
    r = Reassembler()
    rebuilt = [r.offer("e", d, max_total=LIMIT, now=0.0) for _, d, _ in sent]
    assert bytes(rebuilt[-1] or b"") == frame

    async def silent(subject: str, data: bytes, timeout_s: float) -> bytes:
        raise TimeoutError("no answer")

    quiet = PartSender(send, MAX, request=silent, window=2)
    sent.clear()
    await quiet.send("s", frame)
    assert len(sent) == 1 and quiet.stopped == 1  # one part, then no answer to the second
