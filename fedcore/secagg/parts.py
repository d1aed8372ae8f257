"""Secure-aggregation frames larger than one NATS message, in parts, sans-IO.

A frame (:mod:`fedcore.secagg.frame`) that fits ``max_message`` bytes travels as it is.
A larger one (an edge's masked input: 4 bytes a parameter) is cut into parts, each::

    "FGSP" | SHA-256 of the whole frame (32) | u32 index | u32 count | u64 total
           | u32 part size | bytes [index * part size, ...)

Every part but the last holds ``part size`` bytes. The receiver keeps one frame in
progress per sender in a buffer of ``total`` bytes (refused above its limit before any
allocation), places each part at its offset, and hands out the frame once every part is
there and its SHA-256 matches. Parts are pure transport: the frame inside is checked as
before (the secure-aggregation messages are signed where it matters). Core NATS is at most
once: a lost part leaves the frame incomplete, and the trainer's repeated request makes
the edge send the very same frame again (same digest: the parts already here count).
A sender (:class:`PartSender`) does not send a parted frame again while it is still
sending it or within ``repeat_after_s`` after it sent it whole: the trainer repeats its
request every second or so, and a repeat of 100 MB each time would only add traffic.
Flow control: core NATS pushes messages at a subscriber as fast as publishers send them,
and a server disconnects a subscriber that falls behind by its ``max_pending`` (64 MiB):
three edges sending a 100 MB masked input each at once did that to the trainer. So a
sender with ``request`` sends every ``window``-th part (and the last) as a request and
waits for the receiver's answer before going on: the receiver answers once it has taken
that part (and so every part before it), ``ok`` or ``busy`` (the part was dropped, see
below: the sender stops and sends the frame again when asked again). At most ``window``
parts per sender are in flight.
At most ``max_open`` frames are in progress at once, so a receiver's memory does not
grow with the number of senders; a part of another sender is dropped meanwhile (the
trainer's next repeat brings it back) unless the oldest frame in progress is stale.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fedcore.errors import SecAggError

PART_MAGIC = b"FGSP"
_HEAD = struct.Struct(">4s32sIIQI")
PART_HEAD = _HEAD.size
MESSAGE_ROOM = 1024
"""Bytes of a NATS message kept for the protocol line and headers when sizing parts."""

Bytes = bytes | bytearray | memoryview
Send = Callable[[str, bytes], Awaitable[None]]
Request = Callable[[str, bytes, float], Awaitable[bytes]]
"""Publish with a reply subject and wait for the answer's body (``nc.request``); a failure
is a ``TimeoutError`` or an ``OSError``."""
ACK = b"ok"
BUSY = b"busy"


def part_size_for(max_message: int) -> int:
    """The data bytes one part carries in a message of at most ``max_message`` bytes."""
    size = max_message - MESSAGE_ROOM - PART_HEAD
    if size < 1024:
        raise SecAggError("malformed", f"max message {max_message} leaves no room for parts")
    return size


def split(frame: Bytes, max_message: int) -> list[Bytes]:
    """``frame`` itself when it fits ``max_message - MESSAGE_ROOM`` bytes, its parts
    otherwise (views into ``frame`` after a small head each: no copy of the frame)."""
    view = memoryview(frame).cast("B")
    if len(view) + MESSAGE_ROOM <= max_message:
        return [frame]
    size = part_size_for(max_message)
    count = math.ceil(len(view) / size)
    digest = hashlib.sha256(view).digest()
    parts: list[Bytes] = []
    for i in range(count):
        head = _HEAD.pack(PART_MAGIC, digest, i, count, len(view), size)
        parts.append(head + view[i * size : (i + 1) * size])
    return parts


def is_part(data: Bytes) -> bool:
    """Whether a message is a part (rather than a whole frame)."""
    return bytes(memoryview(data)[: len(PART_MAGIC)]) == PART_MAGIC


@dataclass(frozen=True)
class PartHead:
    """The head of one part, checked for consistency."""

    digest: bytes
    index: int
    count: int
    total: int
    size: int

    @classmethod
    def decode(cls, data: memoryview, max_total: int) -> PartHead:
        if len(data) < PART_HEAD:
            raise SecAggError("malformed", f"part of {len(data)} bytes is shorter than its head")
        _, digest, index, count, total, size = _HEAD.unpack_from(data)
        head = cls(digest, index, count, total, size)
        if total > max_total:
            raise SecAggError("oversize", f"parts announce {total} bytes, over {max_total}")
        if size < 1 or count < 2 or count != math.ceil(total / size) or index >= count:
            raise SecAggError(
                "malformed", f"part {index}/{count} of {total} bytes in {size} is inconsistent"
            )
        if len(data) - PART_HEAD != head.length:
            raise SecAggError("malformed", f"part {index} holds {len(data) - PART_HEAD} bytes")
        return head

    @property
    def length(self) -> int:
        """Data bytes this part must hold."""
        return min(self.size, self.total - self.index * self.size)


@dataclass
class _Partial:
    head: PartHead
    buffer: bytearray
    seen: set[int] = field(default_factory=set)
    touched: float = 0.0


class Reassembler:
    """Rebuilds parted frames, one in progress per sender, ``max_open`` at once."""

    def __init__(self, *, max_open: int = 2, stale_s: float = 10.0) -> None:
        if max_open < 1 or stale_s <= 0:
            raise ValueError("need max_open >= 1 and stale_s > 0")
        self.max_open = max_open
        self.stale_s = stale_s
        self._open: dict[str, _Partial] = {}
        self.dropped = 0
        """Parts dropped because ``max_open`` frames were in progress."""

    @property
    def open_bytes(self) -> int:
        """Bytes held by frames in progress."""
        return sum(len(p.buffer) for p in self._open.values())

    def offer(self, sender: str, data: Bytes, *, max_total: int, now: float) -> Bytes | None:
        """The whole frame once ``data`` completes one, ``data`` itself when it is not a
        part, ``None`` while parts are missing. ``SecAggError`` for a malformed part, one
        over ``max_total`` bytes, or a frame whose parts do not hash to its digest."""
        if not is_part(data):
            return data
        view = memoryview(data).cast("B")
        head = PartHead.decode(view, max_total)
        partial = self._partial(sender, head, now)
        if partial is None:
            self.dropped += 1
            return None
        partial.touched = now
        if head.index not in partial.seen:
            at = head.index * head.size
            partial.buffer[at : at + head.length] = view[PART_HEAD:]
            partial.seen.add(head.index)
        if len(partial.seen) < head.count:
            return None
        del self._open[sender]
        if hashlib.sha256(partial.buffer).digest() != head.digest:
            raise SecAggError("malformed", f"parts from {sender} do not hash to their digest")
        return partial.buffer

    def forget(self, sender: str) -> None:
        """Drop ``sender``'s frame in progress."""
        self._open.pop(sender, None)

    def _partial(self, sender: str, head: PartHead, now: float) -> _Partial | None:
        partial = self._open.get(sender)
        same = (head.digest, head.count, head.total, head.size)
        if partial is not None:
            h = partial.head
            if (h.digest, h.count, h.total, h.size) == same:
                return partial
            del self._open[sender]  # a newer frame from this sender replaces the old one
        if len(self._open) >= self.max_open:
            oldest = min(self._open, key=lambda s: self._open[s].touched)
            if now - self._open[oldest].touched < self.stale_s:
                return None
            del self._open[oldest]
        partial = _Partial(head, bytearray(head.total), touched=now)
        self._open[sender] = partial
        return partial


class PartSender:
    """Sends frames through ``send``, in parts when larger than ``max_message``."""

    def __init__(
        self,
        send: Send,
        max_message: int,
        *,
        repeat_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        request: Request | None = None,
        window: int = 8,
        ack_timeout_s: float = 10.0,
    ) -> None:
        if window < 1 or ack_timeout_s <= 0:
            raise ValueError("need window >= 1 and ack_timeout_s > 0")
        self._send = send
        self.request = request
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.max_message = max_message
        self.repeat_after_s = repeat_after_s
        self._clock = clock
        self._sending: set[tuple[str, bytes]] = set()
        self._sent: dict[str, tuple[bytes, float]] = {}  # subject -> (digest, when done)
        self.skipped = 0
        """Repeats of a parted frame not sent (in flight, or sent whole just before)."""
        self.stopped = 0
        """Parted frames stopped midway (the receiver was busy or did not answer)."""
        self.last_stop = ""

    async def send(self, subject: str, frame: bytes) -> None:
        """Send ``frame`` on ``subject`` whole, or in parts."""
        parts = split(frame, self.max_message)
        if len(parts) == 1:
            await self._send(subject, frame)
            return
        key = (subject, bytes(memoryview(parts[0])[4:36]))
        digest, done = self._sent.get(subject, (b"", -math.inf))
        recent = digest == key[1] and self._clock() - done < self.repeat_after_s
        if key in self._sending or recent:
            self.skipped += 1
            return
        self._sending.add(key)
        try:
            whole = await self._send_parts(subject, parts)
        finally:
            self._sending.discard(key)
        if whole:
            self._sent[subject] = (key[1], self._clock())

    async def _send_parts(self, subject: str, parts: list[Bytes]) -> bool:
        """Send every part, waiting for an answer every ``window`` parts when there is
        ``request``; False when the receiver is busy or silent (the frame stops there)."""
        last = len(parts) - 1
        for i, part in enumerate(parts):
            paced = self.request is not None and (i % self.window == self.window - 1 or i == last)
            if not paced or self.request is None:
                await self._send(subject, bytes(part))
                continue
            try:
                answer = await self.request(subject, bytes(part), self.ack_timeout_s)
            except (TimeoutError, OSError) as exc:  # the request wrapper maps NATS errors
                self.stopped += 1
                self.last_stop = repr(exc)
                return False
            if answer != ACK:
                self.stopped += 1
                self.last_stop = answer.decode(errors="replace")
                return False
        return True
