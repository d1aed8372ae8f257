"""The edge's side of secure rounds, without a broker: which rounds it takes, how its
participant answers (repeated requests get the first answer again), and that the learner
hands a secure round's update to the participant instead of publishing an envelope."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from numpy.typing import NDArray

from edge_runtime.learner import Job, Keys, Learner, LearnerConfig
from edge_runtime.rounds_watch import Plan, Refusal, RoundsView, ServedVersion, decide
from edge_runtime.secagg_round import SecAggParticipant, SecAggRoundError
from edge_runtime.spool import Spool
from edge_runtime.worker_reports import Finished
from fedcore import subjects
from fedcore.models import get_spec
from fedcore.secagg import (
    KeyAdvert,
    MaskedInput,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    SurvivorSignature,
    UnmaskResponse,
)
from fedcore.secagg.frame import Frame, Phase
from fedcore.wire import RoundAnnouncement, round_id
from tests.secagg_harness import Cohort

DIGEST = hashlib.sha256(b"v1").hexdigest()
CONFIG = SecAggConfig(clip_norm=1.0)
DIM = 64


def announcement(round_no: int = 3, secure: bool = True, **fields: Any) -> RoundAnnouncement:
    now = time.time()
    values: dict[str, Any] = {
        "model": "digits",
        "round": round_no,
        "mode": "sync",
        "base_version": 1,
        "base_digest": DIGEST,
        "opened_ts": now,
        "deadline_ts": now + 60,
        "secure": secure,
    }
    values.update(fields)
    return RoundAnnouncement(**values)


@pytest.mark.parametrize(
    ("round_secure", "edge_secure", "expected"),
    [
        (True, True, "plan"),
        (False, False, "plan"),
        (True, False, "secure-not-configured"),
        (False, True, "round-not-secure"),
    ],
)
def test_an_edge_takes_secure_rounds_only_when_it_is_set_up_for_them(
    round_secure: bool, edge_secure: bool, expected: str
) -> None:
    served = {1: ServedVersion(1, DIGEST, Path("/v1/weights.npy"))}
    a = announcement(secure=round_secure)
    result = decide(a, "edge-1", served, set(), time.time(), edge_secure)
    if expected == "plan":
        assert isinstance(result, Plan)
    else:
        assert isinstance(result, Refusal) and result.reason == expected and result.loud


def test_an_old_announcement_without_the_field_is_not_secure() -> None:
    raw = announcement(secure=False).model_dump()
    del raw["secure"]
    assert RoundAnnouncement.model_validate(raw).secure is False


class Wire:
    """The participants' outgoing frames, by edge."""

    def __init__(self) -> None:
        self.sent: dict[str, list[Frame]] = {}

    def sender(self, edge: str) -> Any:
        async def send(subject: str, data: bytes) -> None:
            assert subject == subjects.secagg_from_edge("digits", edge)
            self.sent.setdefault(edge, []).append(Frame.decode(data))

        return send

    def last(self, edge: str) -> Frame:
        return self.sent[edge][-1]


def participants(cohort: Cohort, view: RoundsView, wire: Wire) -> dict[str, SecAggParticipant]:
    return {
        e: SecAggParticipant(
            e,
            cohort.identities[e],
            lambda: cohort.enrolled,
            {"digits": CONFIG},
            view,
            wire.sender(e),
        )
        for e in cohort.names
    }


async def ask(
    edges: dict[str, SecAggParticipant], wire: Wire, phase: Phase, bodies: dict[str, bytes]
) -> dict[str, bytes]:
    out = {}
    for e, body in bodies.items():
        before = len(wire.sent.get(e, []))
        await edges[e].handle("digits", Frame(phase, 3, body))
        if len(wire.sent.get(e, [])) > before:
            out[e] = wire.last(e).body
    return out


async def test_participants_run_a_round_and_repeat_their_answers(tmp_path: Path) -> None:
    cohort = Cohort.make(4)
    view, wire = RoundsView(), Wire()
    view.put(announcement(sampled=cohort.names))
    edges = participants(cohort, view, wire)
    server = SecAggServer(CONFIG, round_id("digits", 3), cohort.enrolled, DIM)
    rng = np.random.default_rng(0)
    deltas = {e: rng.normal(0, 0.05, DIM).astype(np.float32) for e in cohort.names}

    setup = server.setup.to_bytes()
    adverts = await ask(edges, wire, Phase.SETUP, dict.fromkeys(cohort.names, setup))
    again = await ask(edges, wire, Phase.SETUP, dict.fromkeys(cohort.names, setup))
    assert again == adverts  # a repeated request: the very same answer
    for body in adverts.values():
        server.receive_advert(KeyAdvert.from_bytes(body))
    bundles = server.close_adverts()
    shares = await ask(
        edges, wire, Phase.ADVERT_BUNDLE, {e: b.to_bytes() for e, b in bundles.items()}
    )
    for body in shares.values():
        server.receive_shares(ShareBundle.from_bytes(body))
    deliveries = server.close_shares()

    early, late, dropped = cohort.names[0], cohort.names[1:3], cohort.names[3]
    await edges[early].submit("digits", 3, deltas[early])  # trained before the shares came
    masked = await ask(
        edges, wire, Phase.DELIVERY, {e: d.to_bytes() for e, d in deliveries.items()}
    )
    assert set(masked) == {early}  # the others have not trained yet
    for e in late:
        await edges[e].submit("digits", 3, deltas[e])
        masked[e] = wire.last(e).body
    with pytest.raises(SecAggRoundError, match="was handed over"):
        await edges[early].submit("digits", 3, deltas[early])
    for body in masked.values():
        server.receive_masked_input(MaskedInput.from_bytes(body))
    # edges[dropped] never trains: it dropped after sharing its keys

    survivors = server.close_masked_inputs().to_bytes()
    sigs = await ask(edges, wire, Phase.SURVIVORS, dict.fromkeys([early, *late], survivors))
    for body in sigs.values():
        server.receive_survivor_signature(SurvivorSignature.from_bytes(body))
    requests = {e: r.to_bytes() for e, r in server.close_signatures().items()}
    responses = await ask(edges, wire, Phase.UNMASK_REQUEST, requests)
    assert await ask(edges, wire, Phase.UNMASK_REQUEST, requests) == responses
    for body in responses.values():
        server.receive_unmask(UnmaskResponse.from_bytes(body))
    result = server.finish()

    assert result.survivors == (early, *late) and result.dropped == (dropped,)
    plain = np.mean([deltas[e].astype(np.float64) for e in result.survivors], axis=0)
    np.testing.assert_allclose(result.mean(), plain, atol=1e-6)
    await edges[early].handle("digits", Frame(Phase.END, 3, b""))
    with pytest.raises(SecAggRoundError, match="not in progress"):
        await edges[early].submit("digits", 3, deltas[early])


async def test_a_participant_excludes_a_neighbour_whose_share_does_not_open() -> None:
    """Failed before: the participant refused the round (``secure-refused``, bad-share)."""
    cohort = Cohort.make(4)
    view, wire = RoundsView(), Wire()
    view.put(announcement(sampled=cohort.names))
    edges = participants(cohort, view, wire)
    server = SecAggServer(CONFIG, round_id("digits", 3), cohort.enrolled, DIM)
    setup = server.setup.to_bytes()
    for body in (await ask(edges, wire, Phase.SETUP, dict.fromkeys(cohort.names, setup))).values():
        server.receive_advert(KeyAdvert.from_bytes(body))
    bundles = {e: b.to_bytes() for e, b in server.close_adverts().items()}
    for body in (await ask(edges, wire, Phase.ADVERT_BUNDLE, bundles)).values():
        server.receive_shares(ShareBundle.from_bytes(body))
    victim = cohort.names[0]
    delivery = server.close_shares()[victim]
    first = delivery.shares[0]
    spoiled = ShareBundle(
        delivery.round_id,
        victim,
        (dataclasses.replace(first, ciphertext=bytes(len(first.ciphertext))), *delivery.shares[1:]),
    )
    await edges[victim].submit("digits", 3, np.zeros(DIM, np.float32))
    masked = await ask(edges, wire, Phase.DELIVERY, {victim: spoiled.to_bytes()})
    assert MaskedInput.from_bytes(masked[victim]).excluded == (first.sender,)
    kinds = [(e.kind, e.reason) for e in edges[victim].events.events()]
    assert ("secure-excluded", f"{first.sender}: bad-share") in kinds
    assert "secure-refused" not in [k for k, _ in kinds]


async def test_a_participant_ignores_rounds_not_announced_as_secure_for_it() -> None:
    cohort = Cohort.make(3)
    view, wire = RoundsView(), Wire()
    edges = participants(cohort, view, wire)
    server = SecAggServer(CONFIG, round_id("digits", 3), cohort.enrolled, DIM)
    setup = Frame(Phase.SETUP, 3, server.setup.to_bytes())
    e = cohort.names[0]
    for a in [None, announcement(secure=False), announcement(4), announcement(sampled=["x"])]:
        if a is not None:
            view.put(a)
        await edges[e].handle("digits", setup)
        assert e not in wire.sent
    with pytest.raises(SecAggRoundError, match="not in progress"):
        await edges[e].submit("digits", 3, np.zeros(DIM, np.float32))
    view.put(announcement())
    await edges[e].handle("digits", setup)
    assert wire.last(e).phase is Phase.ADVERT


async def test_a_restarted_trainers_new_setup_for_the_same_round_starts_afresh() -> None:
    """The same round number with another setup (a trainer that lost its state): the edge
    advertises fresh keys for it, instead of repeating the advert of the old setup."""
    cohort = Cohort.make(3)
    view, wire = RoundsView(), Wire()
    view.put(announcement(sampled=cohort.names))
    edges = participants(cohort, view, wire)
    e = cohort.names[0]
    adverts = []
    for _ in range(2):
        server = SecAggServer(CONFIG, round_id("digits", 3), cohort.enrolled, DIM)
        await edges[e].handle("digits", Frame(Phase.SETUP, 3, server.setup.to_bytes()))
        advert = KeyAdvert.from_bytes(wire.last(e).body)
        server.receive_advert(advert)  # verifies against this setup's digest
        adverts.append(advert)
    assert adverts[0].to_bytes() != adverts[1].to_bytes()


class Worker:
    batches_done = 3

    async def close(self) -> None:
        return None


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, int, NDArray[Any]]] = []

    async def submit(self, model: str, round_no: int, delta: NDArray[Any]) -> None:
        self.got.append((model, round_no, delta))


async def test_the_learner_hands_a_secure_rounds_update_over_unsealed(tmp_path: Path) -> None:
    published: list[bytes] = []

    async def publish(data: bytes) -> None:
        published.append(data)

    async def nothing() -> Any:
        raise AssertionError("not read here")

    sink = Sink()
    config = LearnerConfig(
        "edge-1", "digits", tmp_path / "work", (DIM,), secure=True, recipe=get_spec("digits").recipe
    )
    keys = Keys(
        ed25519.Ed25519PrivateKey.generate(), x25519.X25519PrivateKey.generate().public_key()
    )
    spool = Spool(tmp_path / "spool.db")
    learner = Learner(
        config,
        spool=spool,
        rounds=RoundsView(),
        read_load=nothing,
        read_served=nothing,
        publish=publish,
        keys=keys,
        secagg=sink,
    )
    base = np.zeros(DIM, np.float32)
    local = np.full(DIM, 0.25, np.float32)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    np.save(job_dir / "local.npy", local)
    plan = Plan(announcement(), ServedVersion(1, DIGEST, job_dir / "base.npy"))
    result = Finished(
        batch=2,
        samples=40,
        holdout=0,
        upto=7,
        loss=0.5,
        base_loss=None,
        metric="accuracy",
        value=None,
        base_value=None,
    )
    job = Job(plan, Worker(), base, job_dir, config.recipe, result=result)  # type: ignore[arg-type]
    await learner._finish(job)
    try:
        assert published == []  # no envelope at all
        assert [(m, r) for m, r, _ in sink.got] == [("digits", 3)]
        np.testing.assert_array_equal(sink.got[0][2], local - base)
        assert learner.sent_rounds() == {3}
        masked = learner.events.events("update-masked")
        assert len(masked) == 1 and masked[0].num_samples == 40
    finally:
        spool.close()


def test_edge_settings_need_the_registry_and_a_served_model(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from edge_runtime.settings import EdgeSettings

    base: dict[str, Any] = {
        "edge_id": "edge-1",
        "data_dir": tmp_path,
        "seed_artifacts_dir": tmp_path,
        "trainer_public_key_file": tmp_path / "t.pub",
        "identity_key_file": tmp_path / "e.key",
        "trainer_hpke_public_key_file": tmp_path / "h.pub",
        "triton_control_secret_file": tmp_path / "s",
        "nats_user": "edge-1",
        "nats_password_file": tmp_path / "p",
    }
    with pytest.raises(ValidationError, match="secagg_registry_file is required"):
        EdgeSettings(**base, secagg={"digits": {}})
    with pytest.raises(ValidationError, match="does not serve"):
        EdgeSettings(**base, secagg={"other": {}}, secagg_registry_file=tmp_path / "r")
    with pytest.raises(ValidationError, match="threshold"):
        EdgeSettings(**base, secagg={"digits": {"threshold": 0.2}}, secagg_registry_file=tmp_path)
    ok = EdgeSettings(**base, secagg={"digits": {"clip_norm": 2.0}}, secagg_registry_file=tmp_path)
    assert ok.secagg["digits"].config() == SecAggConfig(clip_norm=2.0)


def test_settings_options_mirror_the_protocol_config() -> None:
    """SecAggOptions repeats SecAggConfig's fields for pydantic: same names, same defaults."""
    import dataclasses

    from fedcore.secagg.options import SecAggOptions

    fields = {f.name: f.default for f in dataclasses.fields(SecAggConfig)}
    options = {name: f.default for name, f in SecAggOptions.model_fields.items()}
    assert options == fields
    assert SecAggOptions().config() == SecAggConfig()
