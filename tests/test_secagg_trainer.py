"""The trainer's side of secure rounds, without a broker: folding the aggregate, central
DP noise on the sum, refusing sealed updates, and a round the trainer lost on restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import CollectorRegistry

from fedcore.enrollment import EdgeRegistry
from fedcore.errors import EnvelopeError
from fedcore.secagg import MaskedInput, SecAggConfig, round_params
from fedcore.secagg.frame import Frame, Phase, masked_frame_bytes
from trainer.driver import RoundDriver, SecAggTarget
from trainer.errors import TrainerError
from trainer.roster import Roster
from trainer.rounds import RoundBook, RoundPolicy, SecAggOutcome
from trainer.secagg_metrics import SecAggMetrics
from trainer.secagg_round import SecAggCoordinator, SecAggRound, SecAggTiming, sensitivity
from trainer.service import open_round, poll_round
from trainer.settings import TrainerSettings
from trainer.strategies import get_strategy

DIGEST = hashlib.sha256(b"v1").hexdigest()
DIM = 8
EDGES = ["edge-1", "edge-2", "edge-3", "edge-4"]


def book(strategy: str = "fedavg", **options: object) -> RoundBook:
    return RoundBook(
        "digits",
        RoundPolicy(min_updates=3),
        get_strategy(strategy, **options),
        version=1,
        digest=DIGEST,
        params=np.zeros(DIM, np.float32),
        seed=0,
    )


class Keys:
    def __init__(self) -> None:
        self.keys = {e: ed25519.Ed25519PrivateKey.generate().public_key() for e in EDGES}

    def active_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
        return dict(self.keys)

    def current(self) -> EdgeRegistry:
        registry = EdgeRegistry()
        for edge, key in self.keys.items():
            registry = registry.enroll(edge, key.public_bytes_raw().hex())
        return registry


def coordinator(sent: list[tuple[str, bytes]]) -> SecAggCoordinator:
    async def send(subject: str, data: bytes) -> None:
        sent.append((subject, data))

    return SecAggCoordinator(
        send, Keys(), {"digits": SecAggConfig()}, {"digits": DIM}, SecAggTiming(1.0, 0.05)
    )


def test_a_secure_aggregate_is_the_unweighted_mean_of_the_survivors() -> None:
    b = book()
    a = b.open(EDGES, now=0.0, secure=True, min_sample=3)
    assert a.secure and a.sampled == EDGES
    total = np.arange(DIM, dtype=np.float64) * 3.0  # three survivors' sum
    b.fold_secagg(total, SecAggOutcome(("edge-1", "edge-2", "edge-3"), ("edge-4",)), 1.0)
    np.testing.assert_allclose(b.finalize(), np.arange(DIM, dtype=np.float32))
    assert b.current is not None and [c.weight for c in b.current.folded.values()] == [1.0] * 3
    with pytest.raises(TrainerError, match="no secure sum"):  # once per round
        b.fold_secagg(total, SecAggOutcome(("edge-1",), ()), 1.0)


def test_central_dp_noise_is_calibrated_to_the_edges_bound() -> None:
    b = book("dp_fedavg", clip_norm=0.5, noise_multiplier=2.0)
    b.open(EDGES, now=0.0, secure=True, min_sample=3)
    assert b.current is not None
    b.fold_secagg(np.zeros(DIM), SecAggOutcome(("edge-1", "edge-2", "edge-3"), ()), 1.25)
    strategy = b.strategy
    assert strategy.noise_std_for(b.current.state) == pytest.approx(2.0 * 1.25)  # type: ignore[attr-defined]
    noisy = b.finalize()  # noise on the sum, divided by the three survivors
    assert np.std(noisy) > 0.1
    params = round_params(SecAggConfig(clip_norm=1.0), 4)
    assert 1.0 < sensitivity(params, 10**6) < 1.0 + 1e-5


def test_sealed_updates_for_a_secure_round_are_refused() -> None:
    b = book()
    b.open(EDGES, now=0.0, secure=True, min_sample=3)
    driver = RoundDriver({"digits": b}, Path("/nonexistent"), {"digits": (DIM,)})
    target = driver.target("digits")
    assert isinstance(target, SecAggTarget)
    with pytest.raises(EnvelopeError, match="securely aggregated"):  # whatever it says
        target.check(None)  # type: ignore[arg-type]


async def test_a_secure_round_waits_for_a_complete_roster_of_enrolled_edges(
    tmp_path: Path,
) -> None:
    settings = TrainerSettings(
        nats_user="trainer",
        nats_password_file=tmp_path / "p",
        data_dir=tmp_path,
        signing_key_file=tmp_path / "s",
        hpke_private_key_file=tmp_path / "h",
        edge_registry_file=tmp_path / "r",
        min_updates=3,
        secagg={"digits": {}},
    )
    secagg, b, roster = coordinator([]), book(), Roster(Keys(), ttl_s=0.2)
    roster.seen = {"edge-1": 1e18, "edge-2": 1e18, "stranger": 1e18}
    assert not open_round(settings, b, roster, secagg)  # the roster is not complete yet
    await asyncio.sleep(0.25)
    assert not open_round(settings, b, roster, secagg)  # two enrolled edges: too few
    roster.seen["edge-3"] = 1e18
    assert open_round(settings, b, roster, secagg)
    assert b.current is not None and b.current.announcement.sampled == EDGES[:3]


async def test_a_secure_round_without_a_running_protocol_fails() -> None:
    """After a restart the checkpoint still holds the open secure round, but its
    protocol state is gone: the round is closed as failed and a new one opens."""
    b = book()
    b.open(EDGES, now=0.0, secure=True, min_sample=3)
    ready, failed = poll_round(b, coordinator([]))
    assert ready and failed is not None and "restarted" in failed


async def test_a_round_with_no_answers_fails_and_tells_the_edges() -> None:
    sent: list[tuple[str, bytes]] = []
    secagg, b = coordinator(sent), book()
    b.open(EDGES, secure=True, min_sample=3)
    secagg.begin(b)
    assert poll_round(b, secagg) == (False, None)
    for _ in range(100):
        ready, failed = poll_round(b, secagg)
        if ready:
            break
        await asyncio.sleep(0.05)
    assert failed is not None and "below-threshold" in failed
    phases = [Frame.decode(data).phase for _, data in sent]
    assert phases.count(Phase.SETUP) >= 2 * len(EDGES)  # requests are repeated
    assert phases[-len(EDGES) :] == [Phase.END] * len(EDGES)
    assert masked_frame_bytes(DIM) < 1024


class Msg:
    def __init__(self, subject: str, data: bytes) -> None:
        self.subject, self.data = subject, data
        self.reply = ""  # as nats.aio.msg.Msg: no reply subject


Tamper = Callable[[str, bytes], bytes]


async def run_in_process(
    min_updates: int,
    silent: str | None,
    *,
    deadline_s: float = 1.0,
    heartbeats: bool = False,
    tamper: Tamper | None = None,
    metrics: SecAggMetrics | None = None,
) -> tuple[RoundBook, str | None]:
    """A coordinator and four edge participants wired to each other in process; the
    ``silent`` edge never trains (and, with ``heartbeats``, is not heard from either);
    ``tamper(subject, data)`` may change what an edge sends to the trainer."""
    from edge_runtime.rounds_watch import RoundsView
    from edge_runtime.secagg_round import SecAggParticipant
    from tests.secagg_harness import Cohort

    cohort = Cohort.make(4)
    keys = Keys()
    keys.keys = dict(cohort.enrolled)
    view = RoundsView()
    edges: dict[str, SecAggParticipant] = {}

    async def to_edge(subject: str, data: bytes) -> None:
        edge = subject.rsplit(".", 1)[1]
        await edges[edge].on_message(Msg(subject, data))  # type: ignore[arg-type]

    async def to_trainer(subject: str, data: bytes) -> None:
        if tamper is not None:
            data = tamper(subject, data)
        await secagg.on_message(Msg(subject, data))  # type: ignore[arg-type]

    def alive() -> list[str]:
        return [e for e in cohort.names if e != silent]

    secagg = SecAggCoordinator(
        to_edge,
        keys,
        {"digits": SecAggConfig()},
        {"digits": DIM},
        SecAggTiming(2.0, 0.05),
        alive if heartbeats else None,
        metrics,
    )
    for e in cohort.names:
        edges[e] = SecAggParticipant(
            e,
            cohort.identities[e],
            lambda: cohort.enrolled,
            {"digits": SecAggConfig()},
            view,
            to_trainer,
        )
    b = RoundBook(
        "digits",
        RoundPolicy(min_updates=min_updates, deadline_s=deadline_s),
        get_strategy("fedavg"),
        version=1,
        digest=DIGEST,
        params=np.zeros(DIM, np.float32),
    )
    view.put(b.open(cohort.names, secure=True, min_sample=3))
    secagg.begin(b)
    for _ in range(200):
        await asyncio.sleep(0.02)
        for e in cohort.names:
            if e != silent:
                with contextlib.suppress(Exception):
                    await edges[e].submit("digits", 1, np.full(DIM, 0.1, np.float32))
        ready, failed = poll_round(b, secagg)
        if ready:
            return b, failed
    raise AssertionError("the secure round never ended")


async def test_coordinator_and_participants_agree_in_process() -> None:
    b, failed = await run_in_process(min_updates=3, silent="edge-003")
    assert failed is None and b.current is not None and b.current.secagg is not None
    assert b.current.secagg.dropped == ("edge-003",)
    np.testing.assert_allclose(b.finalize(), np.full(DIM, 0.1, np.float32), atol=1e-6)


async def test_an_edge_whose_heartbeats_stopped_is_dropped_before_the_deadline() -> None:
    """The round deadline is 60 s; the silent edge has no heartbeat, so the masked-input
    step ends as soon as the others sent theirs (the loop gives up after about 4 s)."""
    b, failed = await run_in_process(
        min_updates=3, silent="edge-003", deadline_s=60.0, heartbeats=True
    )
    assert failed is None and b.current is not None and b.current.secagg is not None
    assert b.current.secagg.dropped == ("edge-003",)
    np.testing.assert_allclose(b.finalize(), np.full(DIM, 0.1, np.float32), atol=1e-6)


async def test_fewer_masked_inputs_than_min_updates_fail_before_unmasking() -> None:
    b, failed = await run_in_process(min_updates=4, silent="edge-003")
    assert failed is not None and "MIN_UPDATES is 4" in failed
    assert b.current is not None and b.current.secagg is None  # nothing was folded


def _bare_round() -> SecAggRound:
    from tests.secagg_harness import Cohort

    async def send(subject: str, data: bytes) -> None:
        return None

    return SecAggRound(
        send,
        model="digits",
        round_no=3,
        config=SecAggConfig(),
        enrolled=Cohort.make(4).enrolled,
        dim=DIM,
        deadline_ts=0.0,
        timing=SecAggTiming(),
    )


def test_an_edge_cannot_flood_the_answer_queue() -> None:
    """Only the awaited answer, from an edge that owes it, one at a time per edge."""
    secagg = _bare_round()
    edges = sorted(secagg.enrolled)
    secagg._awaiting, secagg._pending = Phase.ADVERT, set(edges[:2])
    for _ in range(1000):
        secagg.offer(edges[0], Frame(Phase.ADVERT, 3, b"x"))
    secagg.offer(edges[1], Frame(Phase.SHARES, 3, b"x"))  # not the awaited answer
    secagg.offer(edges[1], Frame(Phase.ADVERT, 2, b"x"))  # another round
    secagg.offer(edges[2], Frame(Phase.ADVERT, 3, b"x"))  # owes nothing
    secagg.offer(edges[1], Frame(Phase.ADVERT, 3, b"x"))
    assert secagg.inbox.qsize() == 2
    assert secagg.dropped_frames == 999 + 3


def test_silence_from_everyone_is_the_trainer_cut_off_not_dropouts() -> None:
    secagg = _bare_round()
    edges = set(secagg.enrolled)
    pending = set(edges)
    secagg._give_up_silent(pending, set())  # NATS down: nobody heard from
    assert pending == edges
    alive = set(sorted(edges)[:3])
    secagg._give_up_silent(pending, alive)
    assert pending == alive


def wrap_masked_input(edge: str) -> Tamper:
    """``edge`` masks ``q + 2**31`` instead of its quantised ``q`` (every coordinate)."""

    def tamper(subject: str, data: bytes) -> bytes:
        frame = Frame.decode(data)
        if not subject.endswith(f".from.{edge}") or frame.phase is not Phase.MASKED_INPUT:
            return data
        msg = MaskedInput.from_bytes(frame.body)
        values = np.frombuffer(msg.values, "<u4").copy()
        values += np.uint32(2**31)
        body = MaskedInput(msg.round_id, msg.edge, values.tobytes(), msg.excluded).to_bytes()
        return Frame(frame.phase, frame.round, body).encode()

    return tamper


async def test_a_wrapped_masked_input_is_refused_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """30-bit values (n = 4): 2**31 is 4 clip norms per coordinate, wrapping the sum to
    -3.6 per coordinate, L2 norm 10.2 where 4 edges clipped to 1 reach at most 4.
    Before, the trainer released that (mean -0.9 per coordinate, honest 0.1)."""
    registry = CollectorRegistry()
    metrics = SecAggMetrics(registry, ["digits"])
    with caplog.at_level(logging.WARNING, logger="trainer.secagg_round"):
        b, failed = await run_in_process(
            min_updates=3, silent=None, tamper=wrap_masked_input("edge-001"), metrics=metrics
        )
    assert failed is not None and "out-of-range" in failed
    assert b.current is not None and b.current.secagg is None  # nothing folded
    assert "L2 norm 10.18" in caplog.text and "out-of-range" in caplog.text
    labels = {"model": "digits", "reason": "out-of-range"}
    assert registry.get_sample_value("fedgate_trainer_secagg_failed_total", labels) == 1
    labels["reason"] = "below-threshold"
    assert registry.get_sample_value("fedgate_trainer_secagg_failed_total", labels) == 0


async def test_a_failed_secure_round_takes_its_reason_from_the_error_type() -> None:
    """A protocol refusal keeps its declared reason; a settings problem is ``config``."""
    refused = _bare_round()
    refused.dim = 0  # the server refuses it: SecAggError("malformed")
    result = await refused.run()
    assert result.aggregate is None and result.reason == "malformed"
    too_few = _bare_round()
    too_few.enrolled = dict(list(too_few.enrolled.items())[:1])  # ConfigError: one edge
    result = await too_few.run()
    assert result.aggregate is None and result.reason == "config"
    assert result.failure is not None and "at least" in result.failure
