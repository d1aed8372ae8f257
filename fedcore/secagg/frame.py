"""The transport frame secure-aggregation messages travel in over core NATS, sans-IO.

A frame is ``phase | round | body``: which step of the protocol the body belongs to, the
trainer's round number (the one in :class:`fedcore.wire.RoundAnnouncement`) and the
protocol message's canonical encoding (``to_bytes()``). The trainer sends on
``fedgate.secagg.<model>.to.<edge>``, each edge answers on
``fedgate.secagg.<model>.from.<edge>`` (:mod:`fedcore.subjects`); NATS permissions confine
every edge to its own two subjects, which is how the trainer knows who sent what.

Core NATS is at most once, so every step is idempotent: the trainer sends a step's request
again to edges that have not answered it, and an edge answers a repeated request with the
answer it gave the first time (:data:`ANSWERS` pairs them).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedcore.errors import SecAggError
from fedcore.secagg.codec import Reader, Writer

FRAME_KIND = 32
FRAME_OVERHEAD = 64
"""Bytes a frame adds to its body, rounded up (header, phase, round, length prefix)."""


class Phase(enum.IntEnum):
    """What a frame carries. Trainer to edge: ``SETUP``, ``ADVERT_BUNDLE``, ``DELIVERY``,
    ``SURVIVORS``, ``UNMASK_REQUEST``, ``END``; edge to trainer: the rest."""

    SETUP = 1
    ADVERT = 2
    ADVERT_BUNDLE = 3
    SHARES = 4
    DELIVERY = 5
    MASKED_INPUT = 6
    SURVIVORS = 7
    SIGNATURE = 8
    UNMASK_REQUEST = 9
    UNMASK_RESPONSE = 10
    END = 11


ANSWERS: dict[Phase, Phase] = {
    Phase.SETUP: Phase.ADVERT,
    Phase.ADVERT_BUNDLE: Phase.SHARES,
    Phase.DELIVERY: Phase.MASKED_INPUT,
    Phase.SURVIVORS: Phase.SIGNATURE,
    Phase.UNMASK_REQUEST: Phase.UNMASK_RESPONSE,
}
"""The answer an edge gives to each request of the trainer."""

TO_EDGE = frozenset({*ANSWERS, Phase.END})
FROM_EDGE = frozenset(ANSWERS.values())


@dataclass(frozen=True)
class Frame:
    """One secure-aggregation message on the wire."""

    phase: Phase
    round: int
    body: bytes

    def encode(self) -> bytes:
        w = Writer().header(FRAME_KIND).u8(int(self.phase)).u64(self.round)
        return w.blob(self.body).finish()

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        """The frame in ``data``; ``SecAggError(malformed)`` for anything else."""
        r = Reader(data, "Frame").header(FRAME_KIND)
        raw_phase, round_no, body = r.u8(), r.u64(), r.blob()
        r.end()
        try:
            phase = Phase(raw_phase)
        except ValueError:
            raise SecAggError("malformed", f"Frame: unknown phase {raw_phase}") from None
        return cls(phase, round_no, body)


def masked_frame_bytes(dim: int) -> int:
    """An upper bound on the bytes of the largest frame of a round over ``dim`` values
    (the masked input: 4 bytes a value), without names."""
    return 4 * dim + FRAME_OVERHEAD + 2 * 256
