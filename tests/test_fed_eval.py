"""Federated evaluation against a real nats-server with the deployment's permissions: two
edges score a candidate on their own held-out splits; the trainer gets aggregates only,
verified and weighted by counts, equal to scoring the union of the splits centrally."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_runtime.fed_eval import EvalResponder
from edge_runtime.spool import Spool, spool_path
from fedcore import fed_eval
from fedcore.models import get_spec
from fedcore.params import flatten
from fedcore.subjects import inbox_prefix
from tests.conftest import NatsServer, start_nats
from tests.test_edge_spool import capture_module
from trainer.bootstrap import train_seed_model
from trainer.evaluate import evaluate
from trainer.fed_eval import federated_evaluate

MODEL = "diabetes"
HOLDOUT = 0.3
EDGES = ["edge-1", "edge-2"]


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = start_nats(tmp_path / "nats", ["trainer", *EDGES, "edge-3"], roles=True)
    yield s
    s.process.stop()


async def connect(server: NatsServer, user: str) -> Any:
    """A connection as the deployment's services make it (their own inbox prefix)."""
    return await nats.connect(
        server.url, user=user, password=server.users[user], inbox_prefix=inbox_prefix(user)
    )


def fill_spool(root: Path, rows: range, model: str = MODEL) -> Spool:
    """Served diabetes requests with their labels, as capture and feedback leave them."""
    x, y, _, _ = get_spec(MODEL).dataset()  # type: ignore[misc]
    path = spool_path(root, model)
    Spool(path).close()
    writer = capture_module()["CaptureWriter"](str(path), 1.0, 1000, 1000, version=1)
    for i in rows:
        out = np.zeros((1, 1), np.float32)
        writer.offer(f"r{i}", [x[i : i + 1]], [out])
    writer.close()
    spool = Spool(path)
    for i in rows:
        spool.join_label(f"r{i}", float(y[i, 0]))
    return spool


async def test_edges_score_a_candidate_and_only_aggregates_travel(
    server: NatsServer, tmp_path: Path
) -> None:
    spec = get_spec(MODEL)
    trainer_key = ed25519.Ed25519PrivateKey.generate()
    edge_keys = {e: ed25519.Ed25519PrivateKey.generate() for e in EDGES}
    spools = {
        "edge-1": fill_spool(tmp_path / "e1", range(0, 120)),
        "edge-2": fill_spool(tmp_path / "e2", range(120, 200)),
    }
    serving = train_seed_model(spec, 0.1, 2, 0)
    candidate = train_seed_model(spec, 1.0, 30, 0)
    conns, responders = [], []
    try:
        for e in EDGES:
            nc = await connect(server, e)
            conns.append(nc)
            responder = EvalResponder(
                e, {MODEL: spools[e]}, edge_keys[e], trainer_key.public_key(), HOLDOUT
            )
            await responder.start(nc)
            responders.append(responder)
        tnc = await connect(server, "trainer")
        conns.append(tnc)
        public = {e: k.public_key() for e, k in edge_keys.items()}
        policy = fed_eval.FedEvalPolicy(min_edges=2, min_samples=10, timeout_s=15)
        result = await federated_evaluate(
            tnc, trainer_key, lambda: public, MODEL, 3, candidate, serving, policy
        )
        # the same numbers as scoring the union of both held-out splits centrally
        held = [s.labelled(spec, HOLDOUT) for s in spools.values()]
        x = np.concatenate([h.x_holdout["features"] for h in held])
        y = np.concatenate([h.y_holdout for h in held])
        assert result.shortfall is None and result.edges == 2 and result.samples == len(y)
        assert result.candidate == pytest.approx(evaluate(spec, candidate, x, y).value, rel=1e-5)
        assert result.serving == pytest.approx(evaluate(spec, serving, x, y).value, rel=1e-5)
        assert result.candidate < result.serving  # MAE: the trained candidate is better

        # a report from an edge the trainer does not know is not counted
        only_one = {"edge-1": public["edge-1"]}
        short = await federated_evaluate(
            tnc, trainer_key, lambda: only_one, MODEL, 4, candidate, serving, policy
        )
        assert short.edges == 1 and short.shortfall is not None
        assert "1 edge(s)" in short.shortfall and "needs 2 edges" in short.shortfall

        # a request not signed by the trainer's key gets no answer at all
        forger = ed25519.Ed25519PrivateKey.generate()
        fast = fed_eval.FedEvalPolicy(min_edges=1, min_samples=1, timeout_s=2)
        forged = await federated_evaluate(
            tnc, forger, lambda: public, MODEL, 5, candidate, serving, fast
        )
        assert forged.edges == 0 and forged.shortfall is not None
    finally:
        for r in responders:
            await r.stop()
        for nc in conns:
            await nc.close()
        for s in spools.values():
            s.close()


async def test_an_edge_may_not_ask_the_fleet_to_evaluate(server: NatsServer) -> None:
    """Only the trainer publishes evaluation requests (edge-3 is refused by the server)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(
        server.url, user="edge-3", password=server.users["edge-3"], error_cb=on_error
    )
    try:
        await nc.publish(fed_eval.subject(MODEL), b"{}")
        await nc.flush()
        import asyncio

        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in errors), errors


def test_combine_weights_by_bounded_counts() -> None:
    def report(edge: str, count: int, c: float, s: float) -> fed_eval.EvalReport:
        return fed_eval.EvalReport(
            edge_id=edge,
            model=MODEL,
            round=1,
            nonce="0" * 32,
            count=count,
            candidate_sum=c,
            serving_sum=s,
            candidate_loss_sum=0.0,
            serving_loss_sum=0.0,
        )

    policy = fed_eval.FedEvalPolicy(min_edges=2, min_samples=10, max_samples_per_edge=100)
    # edge-b claims 1000 samples: it weighs 100, keeping its own mean (2.0 and 4.0)
    out = fed_eval.combine(
        [report("a", 50, 50.0, 150.0), report("b", 1000, 2000.0, 4000.0)], policy
    )
    assert out.samples == 150
    assert out.candidate == pytest.approx((50 * 1.0 + 100 * 2.0) / 150)
    assert out.serving == pytest.approx((50 * 3.0 + 100 * 4.0) / 150)
    few = fed_eval.combine([report("a", 5, 5.0, 5.0), report("b", 4, 4.0, 4.0)], policy)
    assert few.shortfall is not None and "9 held-out samples" in few.shortfall


def test_requests_verify_signature_and_freshness() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    vec = flatten(get_spec(MODEL).build_module())
    req = fed_eval.EvalRequest(
        model=MODEL,
        round=1,
        nonce="a" * 32,
        issued_ts=1000.0,
        candidate=fed_eval.pack(vec),
        serving=fed_eval.pack(vec),
    ).signed(key)
    assert req.verify(key.public_key(), now=1001.0) is None
    assert req.verify(key.public_key(), now=2000.0) == "stale (1000 s old)"
    tampered = req.model_copy(update={"round": 2})
    assert tampered.verify(key.public_key(), now=1001.0) == "bad signature"
    np.testing.assert_array_equal(fed_eval.unpack(req.candidate, vec.size), vec)
    with pytest.raises(ValueError, match="parameters have"):
        fed_eval.unpack(req.candidate, vec.size + 1)


async def test_a_round_is_gated_by_the_edges_when_the_trainer_holds_no_data(
    server: NatsServer, tmp_path: Path
) -> None:
    """A model without an evaluation set at the centre: the release gate asks the edges
    (real NATS, real spools), releases a better candidate and holds a wrecked one; the
    round record says federated evaluation decided, on how many samples."""
    import dataclasses

    from fedcore.models import REGISTRY, register
    from trainer.release import ReleaseContext, _release_or_hold
    from trainer.rounds import Contribution, RoundBook, RoundPolicy
    from trainer.service import federated_runner
    from trainer.settings import TrainerSettings
    from trainer.strategies import get_strategy

    base = get_spec(MODEL)
    spec = dataclasses.replace(base, name="diab_fed", dataset=None, builtin=False)
    register(spec, "test")
    trainer_key = ed25519.Ed25519PrivateKey.generate()
    edge_keys = {e: ed25519.Ed25519PrivateKey.generate() for e in EDGES}
    spools = {
        "edge-1": fill_spool(tmp_path / "e1", range(0, 150), "diab_fed"),
        "edge-2": fill_spool(tmp_path / "e2", range(150, 300), "diab_fed"),
    }
    serving = train_seed_model(base, 0.1, 2, 0)
    better = train_seed_model(base, 1.0, 30, 0)

    class Registry:
        def active_keys(self) -> dict[str, ed25519.Ed25519PublicKey]:
            return {e: k.public_key() for e, k in edge_keys.items()}

    settings = TrainerSettings.model_construct(
        fed_eval_min_edges=2,
        fed_eval_min_samples=20,
        fed_eval_max_samples_per_edge=5000,
        fed_eval_timeout_s=15.0,
    )
    conns, responders = [], []
    try:
        for e in EDGES:
            nc = await connect(server, e)
            conns.append(nc)
            r = EvalResponder(
                e, {"diab_fed": spools[e]}, edge_keys[e], trainer_key.public_key(), HOLDOUT
            )
            await r.start(nc)
            responders.append(r)
        tnc = await connect(server, "trainer")
        conns.append(tnc)
        runner = federated_runner(settings, tnc, trainer_key, Registry())  # type: ignore[arg-type]
        ctx = ReleaseContext(
            spec,
            trainer_key,
            tmp_path / "art",
            0.0,
            None,
            None,
            federated=runner,
        )
        (tmp_path / "state").mkdir()
        book = RoundBook(
            "diab_fed",
            RoundPolicy(min_updates=1),
            get_strategy("fedavg"),
            version=1,
            digest="ab" * 32,
            params=serving,
        )

        async def close(delta: np.ndarray[Any, Any], round_no: int) -> Any:
            book.open(["edge-1"], now=0.0)
            book.fold(Contribution("a" * 32, "edge-1", 10, 1, 0.0), delta.astype(np.float32))
            return await _release_or_hold(
                ctx,
                book,
                tnc.jetstream(),
                [],
                round_no,
                lambda outcome, reason, **kw: {"outcome": outcome, "reason": reason, **kw},
            )

        released = await close(better - serving, 1)
        assert released["outcome"] == "released", released["reason"]
        assert released["evaluation"] == "federated" and released["metric"] == "mae"
        held_out = sum(len(s.labelled(spec, HOLDOUT).y_holdout) for s in spools.values())
        assert released["eval_samples"] == held_out > 20
        assert released["value"] < released["serving_value"]
        assert "(federated: 2 edges)" in released["reason"]
        assert book.version == 2

        held = await close(np.full(serving.size, 3.0), 2)  # a wrecking update
        assert held["outcome"] == "held" and held["evaluation"] == "federated"
        assert "held-out mae" in held["reason"] and "above serving" in held["reason"]
        assert book.version == 2
    finally:
        for r in responders:
            await r.stop()
        for nc in conns:
            await nc.close()
        for s in spools.values():
            s.close()
        REGISTRY.pop("diab_fed", None)
