"""Closing a round: finalize, evaluate, gate, and release a signed version (or hold it).

A released version is exported to ONNX (checked against torch), written into the model
repository layout with its ``model.py`` and ``weights.npy``, signed, uploaded to the NATS
object store, and its lineage recorded. Every closed round, released or not, leaves a
:class:`fedcore.wire.RoundRecord` in the round log.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.js.client import JetStreamContext
from numpy.typing import NDArray

from fedcore.artifact import Manifest
from fedcore.artifact_store import upload_version
from fedcore.errors import ArtifactError, ModelSpecError
from fedcore.fed_eval import FedEvalResult
from fedcore.kv import kv_bucket
from fedcore.params import load_signed_weights
from fedcore.spec import ModelSpec
from fedcore.triton_model import ONNX_FILE
from fedcore.wire import (
    LINEAGE_BUCKET,
    ROUND_LOG_BUCKET,
    Contributor,
    Lineage,
    RoundRecord,
    round_key,
    version_key,
)
from trainer.bootstrap import write_version
from trainer.evaluate import (
    Metrics,
    evaluate_scores,
    gate,
    paired_standard_error,
    weighted_edge_metric,
)
from trainer.retry import retry_transient
from trainer.rounds import RoundBook

log = logging.getLogger(__name__)


FederatedEval = Callable[[str, int, NDArray[Any], NDArray[Any]], Awaitable[FedEvalResult]]


@dataclass(frozen=True)
class Decision:
    """What the gate decided, on which evaluation and how many samples."""

    candidate: Metrics | None
    serving: Metrics | None
    release: bool
    reason: str
    evaluation: str
    samples: int
    paired_se: float | None = None
    """the central gate's standard error of candidate minus serving"""


@dataclass(frozen=True)
class ReleaseContext:
    """What closing a round needs besides the book."""

    spec: ModelSpec
    key: ed25519.Ed25519PrivateKey
    artifacts_dir: Path
    margin: float
    eval_x: Any
    """the evaluation inputs: an array (one-input models) or arrays by input name; None
    when the trainer holds no evaluation set (the edges evaluate: ``federated``)"""
    eval_y: NDArray[Any] | None
    replicas: int = 1
    """of the buckets a release writes (``nats_replicas``), should one be missing"""
    federated: FederatedEval | None = None
    """asks the edges to score (model, round, candidate, serving) on their held-out splits"""
    gate_z: float | None = None
    """the central gate's margin is at least this many paired standard errors of the
    candidate-minus-serving difference (None: the fixed ``margin`` alone)"""


def version_digest(manifest: Manifest) -> str:
    """A version's digest: the SHA-256 of its ONNX file, as its manifest lists it (one
    whose signature was checked: ``verify_version_dir`` or ``read_signed_manifest``)."""
    if ONNX_FILE not in manifest.files:
        raise ArtifactError("missing-file", f"version {manifest.version} lists no {ONNX_FILE}")
    return manifest.files[ONNX_FILE]


def _contributors(book: RoundBook) -> list[Contributor]:
    rnd = book.current
    if rnd is None:
        return []
    return [
        Contributor(
            edge_id=c.edge_id,
            samples=c.samples,
            base_version=c.base_version,
            weight=c.weight,
            metrics=c.metrics,
        )
        for c in sorted(rnd.folded.values(), key=lambda c: c.edge_id)
    ]


def _gate(ctx: ReleaseContext, book: RoundBook, candidate: NDArray[Any]) -> Decision:
    """The gate on the trainer's own evaluation set (blocking: torch)."""
    if ctx.eval_y is None:
        raise RuntimeError("central gate without an evaluation set")
    cand, cand_scores = evaluate_scores(ctx.spec, candidate, ctx.eval_x, ctx.eval_y)
    serving, serving_scores = evaluate_scores(ctx.spec, book.params, ctx.eval_x, ctx.eval_y)
    se = paired_standard_error(cand_scores, serving_scores)
    folded = book.current.folded.values() if book.current else []
    name = ctx.spec.task.metric
    reports = {  # weighted as folded: a claimed sample count is capped (trainer.bounds)
        c.edge_id: (c.metrics[name], round(c.weight)) for c in folded if name in c.metrics
    }
    decision = gate(
        cand,
        serving,
        margin=ctx.margin,
        edge_value=weighted_edge_metric(reports),
        noise=0.0 if ctx.gate_z is None else ctx.gate_z * se,
    )
    return Decision(cand, serving, decision.release, decision.reason, "central", cand.samples, se)


async def _federated_gate(
    ctx: ReleaseContext, book: RoundBook, candidate: NDArray[Any], round_no: int
) -> Decision:
    """The gate on the edges' held-out splits: aggregates only, weighted by their counts."""
    if ctx.federated is None:
        raise RuntimeError("no evaluation set and no federated evaluation")
    fed = await ctx.federated(ctx.spec.name, round_no, candidate, book.params)
    if fed.shortfall is not None or fed.candidate is None or fed.serving is None:
        return Decision(None, None, False, str(fed.shortfall), "federated", fed.samples)
    name = ctx.spec.task.metric
    cand = Metrics(name, fed.candidate, float(fed.candidate_loss or 0.0), fed.samples)
    serving = Metrics(name, fed.serving, float(fed.serving_loss or 0.0), fed.samples)
    decision = gate(cand, serving, margin=ctx.margin)
    reason = f"{decision.reason} (federated: {fed.edges} edges)"
    return Decision(cand, serving, decision.release, reason, "federated", fed.samples)


def record_metrics(d: Decision) -> dict[str, Any]:
    """A round record's metric fields (``accuracy`` too when the metric is accuracy)."""
    out: dict[str, Any] = {"evaluation": d.evaluation, "eval_samples": d.samples}
    if d.paired_se is not None:
        out["paired_se"] = d.paired_se
    cand, serving = d.candidate, d.serving
    if cand is None or serving is None:
        return out
    out.update(
        metric=cand.metric,
        higher_is_better=cand.spec.higher_is_better,
        value=cand.value,
        serving_value=serving.value,
        loss=cand.loss,
    )
    if cand.metric == "accuracy":
        out.update(accuracy=cand.value, serving_accuracy=serving.value)
    return out


def _write(
    ctx: ReleaseContext, book: RoundBook, candidate: NDArray[Any], version: int, round_no: int
) -> tuple[Path, str, NDArray[Any]]:
    """Write, sign and verify ``version``: its directory, digest and mapped parameters
    (hashed from the descriptor that is mapped: :func:`fedcore.params.load_signed_weights`)."""
    directory = ctx.artifacts_dir / ctx.spec.name / str(version)
    write_version(
        ctx.spec,
        candidate,
        directory,
        ctx.key,
        version=version,
        parent_version=book.version,
        round_no=round_no,
    )
    # the ONNX file was checked in the export child (a parse here is the model once more)
    manifest, mapped = load_signed_weights(
        directory, ctx.key.public_key(), model=ctx.spec.name, version=version, check_onnx=False
    )
    return directory, version_digest(manifest), mapped


async def close_round(
    ctx: ReleaseContext, book: RoundBook, js: JetStreamContext, *, failed: str | None = None
) -> RoundRecord:
    """End the open round: release a new version, hold it back, or record the failure."""
    rnd = book.current
    if rnd is None:
        raise RuntimeError("close_round without an open round")
    a = rnd.announcement
    closed_ts = book.begin_close()  # no update joins while the release runs
    book.fold_held()  # updates held back for the round's bounds are folded now
    contributors = _contributors(book)
    secagg = rnd.secagg

    def record(outcome: str, reason: str, **extra: Any) -> RoundRecord:
        return RoundRecord(
            model=book.model,
            round=a.round,
            mode=a.mode,
            outcome=outcome,
            reason=reason,
            base_version=a.base_version,
            epsilon=book.strategy.epsilon_spent(),
            opened_ts=a.opened_ts,
            closed_ts=closed_ts,
            contributors=contributors,
            secure=a.secure,
            recipe=a.recipe,
            survivors=None if secagg is None else len(secagg.survivors),
            dropped=None if secagg is None else len(secagg.dropped),
            **extra,
        )

    if failed is not None:
        result = record("failed", failed)
        book.abandon()
    else:
        result = await _release_or_hold(ctx, book, js, contributors, a.round, record)
    key = round_key(book.model, a.round)
    await retry_transient(
        lambda: _put(js, ROUND_LOG_BUCKET, key, result.encode(), ctx.replicas), "round record"
    )
    log.info(
        "round closed",
        extra={
            "model": book.model,
            "round": a.round,
            "outcome": result.outcome,
            "reason": result.reason,
        },
    )
    return result


async def _release_or_hold(
    ctx: ReleaseContext,
    book: RoundBook,
    js: JetStreamContext,
    contributors: list[Contributor],
    round_no: int,
    record: Any,
) -> RoundRecord:
    # finalize steps the server optimiser (momentum, moments); book.hold() undoes it, so
    # a held candidate leaves no step behind for later rounds to carry
    candidate = await asyncio.to_thread(book.finalize)
    if ctx.eval_y is None:
        decision = await _federated_gate(ctx, book, candidate, round_no)
    else:
        decision = await asyncio.to_thread(_gate, ctx, book, candidate)
    metrics = record_metrics(decision)
    metrics["step_scale"] = book.step_scale

    def hold(why: str) -> RoundRecord:
        book.hold()
        result: RoundRecord = record("held", why, **metrics)
        return result

    reason, cand = decision.reason, decision.candidate
    if not decision.release or cand is None:
        return hold(reason)
    version = book.newest + 1  # after a rebase, newer numbers than the base are taken
    try:
        directory, digest, mapped = await asyncio.to_thread(
            _write, ctx, book, candidate, version, round_no
        )
    except ModelSpecError as exc:  # the candidate cannot be served: held, the trainer goes on
        log.error("candidate not exportable", extra={"model": book.model, "error": str(exc)})
        shutil.rmtree(ctx.artifacts_dir / book.model / str(version), ignore_errors=True)
        return hold(f"export failed: {exc}")
    await retry_transient(
        lambda: upload_version(js, book.model, version, directory, replicas=ctx.replicas),
        "version upload",
    )
    lineage = _lineage(book, version, digest, round_no, contributors, cand)
    key = version_key(book.model, version)
    await retry_transient(
        lambda: _put(js, LINEAGE_BUCKET, key, lineage.encode(), ctx.replicas), "lineage"
    )
    # the new base is its file, mapped: folds do not keep it resident (the candidate goes)
    book.release(version, digest, mapped)
    released: RoundRecord = record("released", reason, released_version=version, **metrics)
    return released


def _lineage(
    book: RoundBook,
    version: int,
    digest: str,
    round_no: int,
    contributors: list[Contributor],
    cand: Metrics,
) -> Lineage:
    """The lineage record of ``book``'s candidate released as ``version``."""
    return Lineage(
        model=book.model,
        version=version,
        parent_version=book.version,
        round=round_no,
        digest=digest,
        strategy=book.strategy.name,
        contributors=contributors,
        samples=sum(c.samples for c in contributors),
        metric=cand.metric,
        value=cand.value,
        accuracy=cand.value if cand.metric == "accuracy" else None,
        loss=cand.loss,
        epsilon=book.strategy.epsilon_spent(),
        created_ts=time.time(),
    )


async def _put(js: JetStreamContext, bucket: str, key: str, value: bytes, replicas: int) -> None:
    kv = await kv_bucket(js, bucket, replicas)
    await kv.put(key, value)
