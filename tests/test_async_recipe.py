"""Issue #18 items 1 and 2, without servers: async rounds that do not stall (edge plans
and jobs past the buffer timeout, stale jobs that go on, buffers that close on timeout)
and a round announcement whose recipe binds what the edges compute."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.finetune import Control, recipe_metrics, run_job, told
from edge_runtime.learning import recipe_for
from edge_runtime.rounds_watch import Plan, ServedVersion, decide, still_takes
from edge_runtime.settings import EdgeSettings
from edge_runtime.worker_reports import Finished, WorkerReport
from fedcore.models import get_spec
from fedcore.params import load_weights_file
from fedcore.spec import TrainingRecipe
from fedcore.wire import ClientRecipe, RoundAnnouncement, RoundRecord
from tests.conftest import SignedArtifacts
from tests.test_edge_finetune import job
from tests.test_rounds import DIGEST, book, contrib
from trainer.rounds import RoundPolicy, told_recipe
from trainer.strategies import get_strategy


def announced(round_no: int, base: int, **fields: Any) -> RoundAnnouncement:
    values: dict[str, Any] = {
        "model": "digits",
        "round": round_no,
        "mode": "async",
        "base_version": base,
        "base_digest": DIGEST,
        "opened_ts": 100.0,
        "deadline_ts": 103.0,
        "buffer_size": 3,
        "min_updates": 2,
        "max_staleness": 2,
    } | fields
    return RoundAnnouncement(**values)


def served(*versions: int) -> dict[int, ServedVersion]:
    return {v: ServedVersion(v, DIGEST, Path(f"/nonexistent/{v}.npy")) for v in versions}


def test_an_async_round_takes_plans_past_its_buffer_timeout() -> None:
    """Failed before: every async plan after ``deadline_ts`` was ``deadline-passed``."""
    plan = decide(announced(1, 1), "edge-1", served(1), set(), now=161.0)
    assert isinstance(plan, Plan) and plan.base.version == 1
    sync = decide(announced(1, 1, mode="sync"), "edge-1", served(1), set(), now=161.0)
    assert not isinstance(sync, Plan) and sync.reason == "deadline-passed"


def test_a_stale_async_job_goes_on_within_max_staleness() -> None:
    """Failed before: a job was abandoned whenever the round or base moved, in any mode."""
    plan = Plan(announced(1, 1), served(1)[1])
    assert still_takes(plan, announced(1, 1), now=500.0) is None  # past the timeout
    assert still_takes(plan, announced(2, 2), now=500.0) is None  # moved on: stale by 1
    assert still_takes(plan, announced(3, 3), now=500.0) is None  # stale by 2
    assert still_takes(plan, announced(4, 4), now=500.0) == "too-stale"
    sync = Plan(announced(1, 1, mode="sync"), served(1)[1])
    assert still_takes(sync, announced(2, 2, mode="sync"), now=101.0) == "round-changed"
    assert still_takes(sync, announced(1, 1, mode="sync"), now=104.0) == "deadline-passed"
    assert still_takes(sync, announced(1, 1, mode="sync"), now=101.0) is None


def test_an_async_buffer_closes_when_full_or_at_its_timeout_with_min_updates() -> None:
    """Failed before: a buffer that was not full never closed."""
    b = book(RoundPolicy(mode="async", buffer_size=3, min_updates=2, deadline_s=3.0))
    a = b.open(["edge-1", "edge-2", "edge-3"], now=0.0)
    assert (a.min_updates, a.buffer_size, a.deadline_ts) == (2, 3, 3.0)
    b.fold(contrib("a", "edge-1", 10), np.ones(3, np.float32))
    assert b.next_step(now=1.0) == "wait"
    assert b.next_step(now=10.0) == "wait"  # past the timeout, short of min_updates: no fail
    b.fold(contrib("b", "edge-2", 10, base=2), np.ones(3, np.float32))
    assert b.next_step(now=2.9) == "wait"
    assert b.next_step(now=3.0) == "close"
    b.fold(contrib("c", "edge-3", 10), np.ones(3, np.float32))
    assert b.next_step(now=0.5) == "close"  # full


def test_the_announcement_carries_the_strategy_and_recipe() -> None:
    """Failed before: the announcement had no recipe, so the trainer's mu reached nobody."""
    policy = RoundPolicy(recipe=ClientRecipe(lr=0.01, max_steps=4))
    b = book(policy, strategy="fedprox")
    b.strategy = get_strategy("fedprox", mu=0.25)
    a = b.open(["edge-1"], now=0.0)
    assert a.recipe == ClientRecipe(proximal_mu=0.25, lr=0.01, max_steps=4)
    assert RoundAnnouncement.decode(a.encode()) == a
    # an explicit setting wins over the strategy's option; fedavg says nothing
    mine = ClientRecipe(proximal_mu=0.5)
    assert told_recipe(get_strategy("fedprox", mu=0.25), mine) == mine
    assert told_recipe(get_strategy("fedavg"), ClientRecipe()) is None
    # older messages (no recipe) still decode; a round record names what was told
    old = announced(1, 1).model_dump(exclude={"recipe"})
    assert RoundAnnouncement(**old).recipe is None
    assert RoundRecord.model_fields["recipe"].default is None


def test_precedence_announcement_over_edge_setting_over_spec() -> None:
    spec = get_spec("digits")
    settings = EdgeSettings.model_construct(
        train_optimizer=None,
        train_epochs=3,
        train_batch_size=None,
        train_lr=None,
        train_momentum=None,
        train_weight_decay=None,
        train_max_steps=None,
        proximal_mu=0.1,
    )
    edge = recipe_for(settings, spec)
    assert (edge.epochs, edge.proximal_mu, edge.lr) == (3, 0.1, spec.recipe.lr)
    assert edge.max_steps is None and TrainingRecipe().proximal_mu == 0.0
    over = told(edge, ClientRecipe(proximal_mu=2.0, batch_size=8))
    assert (over.proximal_mu, over.batch_size, over.epochs) == (2.0, 8, 3)
    assert told(edge, None) == edge
    used = recipe_metrics(over)
    assert used["recipe_mu"] == 2.0 and used["recipe_batch_size"] == 8.0


def _delta_norm(root: Path, signed: SignedArtifacts, recipe: TrainingRecipe) -> tuple[float, int]:
    root.mkdir()
    spec = job(root, signed, **dataclasses.asdict(recipe))
    reports: list[WorkerReport] = []
    run_job(spec, Control.create(spec.control), reports.append)
    assert isinstance(reports[-1], Finished), reports[-1]
    local = load_weights_file(spec.output, expected=signed.params.size)
    return float(np.linalg.norm(local - signed.params)), reports[-1].batch


def test_the_trainers_mu_and_step_bound_change_what_the_edge_computes(
    tmp_path: Path, signed_v1: SignedArtifacts
) -> None:
    """The edge's own setting says mu 0; the trainer's FedProx mu decides. Before, the
    announcement carried no mu and both runs trained the same."""
    edge = TrainingRecipe(epochs=8, lr=0.05, proximal_mu=0.0)
    norms = {}
    for mu in (0.0, 20.0):
        b = book(RoundPolicy(recipe=ClientRecipe(max_steps=30)), strategy="fedprox")
        b.strategy = get_strategy("fedprox", mu=mu)
        a = b.open(["edge-1"], now=0.0)
        norms[mu], batches = _delta_norm(tmp_path / str(mu), signed_v1, told(edge, a.recipe))
        assert batches == 30  # 8 epochs of ~5 batches, bounded to 30 by the trainer
    assert norms[20.0] < 0.7 * norms[0.0], norms
