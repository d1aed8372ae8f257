"""The trainer service: bootstrap, transport, then rounds until stopped.

Per model: restore the round book from its checkpoint (or start from the newest signed
version), fold again what the ledger accepted after the checkpoint, announce the open
round in KV ``fedgate_rounds``, and let the ingestor fold updates while the round loop
decides when to close, release (or hold) a version, and open the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import nats
from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from fedcore import subjects
from fedcore.artifact_store import models_bucket, upload_version
from fedcore.compression import sizes_from_layout
from fedcore.envelope import RecipientPrivateKey
from fedcore.fed_eval import FedEvalPolicy, FedEvalResult
from fedcore.keys import load_ed25519, load_hpke_key
from fedcore.kv import kv_bucket
from fedcore.models import get_spec
from fedcore.nats_client import close_service, connect_service
from fedcore.params import layout
from fedcore.secagg.config import MIN_PARTICIPANTS
from fedcore.transport import INLINE_MAX_BYTES, StreamSpec
from fedcore.weights import evaluation_data
from fedcore.wire import (
    LINEAGE_BUCKET,
    ROUND_LOG_BUCKET,
    ROUNDS_BUCKET,
)
from trainer.books import build_book, released_versions
from trainer.bootstrap import ensure_version_one
from trainer.bus import ensure_transport
from trainer.driver import RoundDriver
from trainer.errors import PrivacyBudgetExceeded
from trainer.fed_eval import federated_evaluate
from trainer.ingest import IngestOptions, UpdateIngestor
from trainer.ingest_metrics import IngestMetrics
from trainer.ledger import UpdateLedger
from trainer.registry import RegistryFile, keep_mirrored, mirror_registry
from trainer.release import FederatedEval, ReleaseContext, close_round
from trainer.retry import retry_transient
from trainer.rollout_client import RolloutRequester, rollout_requester
from trainer.roster import Roster
from trainer.rounds import RoundBook
from trainer.secagg_metrics import SecAggMetrics
from trainer.secagg_round import SecAggCoordinator, SecAggResult, SecAggTiming, fold_result
from trainer.secagg_setup import secagg_configs
from trainer.serving_watch import ServingWatch
from trainer.settings import TrainerSettings
from trainer.telemetry import RoundOutcomes, start_metrics

log = logging.getLogger(__name__)


def bootstrap(settings: TrainerSettings) -> None:
    """Make sure version 1 of every configured model exists and is signed."""
    key = load_ed25519(settings.signing_key_file)
    for name in settings.models:
        spec = get_spec(name)
        ensure_version_one(
            spec,
            settings.artifacts_dir,
            settings.state_dir,
            key,
            fraction=settings.bootstrap_seed_fraction,
            epochs=settings.bootstrap_epochs,
            seed=settings.seed,
            recipe=spec.recipe.overridden(**settings.recipe_overrides()),
        )


def updates_spec(settings: TrainerSettings, max_payload: int) -> StreamSpec:
    """The updates stream and object bucket of ``settings``, with their limits; messages up
    to what edges send inline (``max_payload``, at most ``INLINE_MAX_BYTES``)."""
    return StreamSpec(
        duplicate_window_s=settings.updates_duplicate_window_s,
        max_age_s=settings.updates_max_age_s,
        max_msg_size=min(max_payload, INLINE_MAX_BYTES),
        replicas=settings.nats_replicas,
        max_bytes=settings.updates_max_bytes,
        max_msgs_per_subject=settings.updates_max_msgs_per_subject,
        object_max_bytes=settings.updates_object_max_bytes,
    )


async def prepare_transport(nc: NATS, settings: TrainerSettings, registry: RegistryFile) -> None:
    """Create every stream and bucket the trainer owns, with ``nats_replicas`` (scaling up
    one that has fewer): the updates stream, its object bucket and the ledger, the rounds,
    round log and lineage buckets, the models object store; mirror the edge registry."""
    js = nc.jetstream()
    replicas = settings.nats_replicas
    await ensure_transport(js, updates_spec(settings, nc.max_payload))
    await UpdateLedger.open(js, replicas=replicas)
    await mirror_registry(js, registry.current(), replicas=replicas)
    for bucket in (ROUNDS_BUCKET, ROUND_LOG_BUCKET, LINEAGE_BUCKET):
        await kv_bucket(js, bucket, replicas)
    await models_bucket(js, create=True, replicas=replicas)


async def announce(js: JetStreamContext, book: RoundBook, replicas: int = 1) -> None:
    if book.current is None:
        return
    kv = await kv_bucket(js, ROUNDS_BUCKET, replicas)
    await kv.put(book.model, book.current.announcement.encode())
    log.info("round open", extra={"model": book.model, "round": book.current.round})


def open_round(
    settings: TrainerSettings, book: RoundBook, roster: Roster, secagg: SecAggCoordinator | None
) -> bool:
    """Open ``book``'s next round; False when it cannot open yet (a secure round waits
    for ``max(3, min_updates)`` enrolled edges alive). Raises ``PrivacyBudgetExceeded``."""
    if secagg is None or not secagg.handles(book.model):
        book.open(roster.alive())
        return True
    minimum = max(MIN_PARTICIPANTS, settings.min_updates)
    cohort = secagg.cohort(roster.alive(), minimum) if roster.complete() else None
    if cohort is None:
        return False
    book.open(cohort, secure=True, min_sample=minimum)
    return True


def poll_round(book: RoundBook, secagg: SecAggCoordinator | None) -> tuple[bool, str | None]:
    """(time to close, failure reason) of ``book``'s open round; a finished secure round's
    aggregate is folded here."""
    rnd = book.current
    if rnd is not None and rnd.announcement.secure:
        result = secagg.outcome(book.model) if secagg is not None else None
        if result is None and secagg is not None:
            return False, None
        return True, fold_result(book, result or SecAggResult(None, "secure aggregation is off"))
    step = book.next_step()
    return step != "wait", "deadline passed without quorum" if step == "fail" else None


async def stream_behind(
    book: RoundBook, backlog: Callable[[], Awaitable[int]] | None, grace_s: float
) -> bool:
    """True while ``book``'s sync round, past its deadline by less than ``grace_s``, should
    wait for updates the stream still holds: sent in time, not handled yet (after a
    restart, those the killed trainer had fetched come back only after the ack wait)."""
    rnd = book.current
    if backlog is None or rnd is None or rnd.announcement.secure or rnd.closing_ts:
        return False
    a, now = rnd.announcement, time.time()
    if a.mode != "sync" or not a.deadline_ts <= now < a.deadline_ts + grace_s:
        return False
    try:
        return await backlog() > 0
    except (TimeoutError, nats.errors.Error):
        return False


async def run_rounds(
    settings: TrainerSettings,
    driver: RoundDriver,
    contexts: dict[str, ReleaseContext],
    js: JetStreamContext,
    roster: Roster,
    stop: asyncio.Event,
    rollouts: RolloutRequester | None = None,
    secagg: SecAggCoordinator | None = None,
    outcomes: RoundOutcomes | None = None,
    backlog: Callable[[], Awaitable[int]] | None = None,
    follow: ServingWatch | None = None,
) -> None:
    """Open, watch and close rounds of every model until ``stop`` (or ``max_rounds`` of
    each model); each released version is handed to ``rollouts`` (the gateway rolls it
    out); secure rounds run through ``secagg``; ``outcomes`` counts how rounds ended;
    ``backlog`` (the ingestor's) holds a round past its deadline while updates wait in the
    stream; ``follow`` rebases a model's rounds on the version its fleet went back to."""
    closed = dict.fromkeys(driver.books, 0)  # per model: one model's rounds are its own
    exhausted: set[str] = set()
    while not stop.is_set():
        for model, book in driver.books.items():
            if follow is not None:
                await follow.apply(model)
            if book.current is None:
                if settings.max_rounds is not None and closed[model] >= settings.max_rounds:
                    continue
                if model in exhausted:
                    continue
                try:
                    if not open_round(settings, book, roster, secagg):
                        continue
                except PrivacyBudgetExceeded as exc:
                    log.warning("no more rounds: %s", exc, extra={"model": model})
                    exhausted.add(model)
                    continue
                driver.save(model)
                await retry_transient(
                    partial(announce, js, book, settings.nats_replicas), "round announcement"
                )
                if secagg is not None and book.current and book.current.announcement.secure:
                    secagg.begin(book)
                continue
            ready, failed = poll_round(book, secagg)
            if not ready or await stream_behind(book, backlog, settings.updates_ack_wait_s + 5):
                continue
            record = await close_round(contexts[model], book, js, failed=failed)
            if outcomes is not None:
                outcomes.observe(record)
            if rollouts is not None and record.released_version is not None:
                rollouts.request(model, record.released_version)
            driver.save(model)
            closed[model] += 1
            await asyncio.sleep(settings.round_interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def serve(settings: TrainerSettings) -> None:
    """Check the settings, bootstrap, connect to NATS and run rounds until SIGTERM or
    SIGINT."""
    secagg_configs(settings)  # refuse impossible secure-aggregation settings first
    recipient = load_hpke_key(settings.hpke_private_key_file, settings.hpke_kem).private
    await asyncio.to_thread(bootstrap, settings)
    signing = load_ed25519(settings.signing_key_file)
    registry = RegistryFile(settings.edge_registry_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect_service(settings, "trainer")
    try:
        await prepare_transport(nc, settings, registry)
        await _run(settings, nc, recipient, signing, registry, stop)
    finally:
        # every update the trainer acknowledged is folded and checkpointed, and the
        # unacknowledged ones are redelivered (fedcore.nats_client: close, not drain)
        await close_service(nc)


async def _run(
    settings: TrainerSettings,
    nc: NATS,
    recipient: RecipientPrivateKey,
    signing: ed25519.Ed25519PrivateKey,
    registry: RegistryFile,
    stop: asyncio.Event,
) -> None:
    js = nc.jetstream()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    books = {m: build_book(settings, m, signing.public_key()) for m in settings.models}
    driver = RoundDriver(books, settings.state_dir, model_sizes(settings))
    federated = federated_runner(settings, nc, signing, registry)
    contexts = {m: release_context(settings, m, signing, federated) for m in settings.models}
    await upload_released(js, settings)
    telemetry = start_metrics(settings, books)
    ingestor = await start_ingestor(settings, js, recipient, registry, driver, telemetry.registry)
    rollouts = rollout_requester(settings)
    follow = ServingWatch.for_trainer(settings, js, driver, signing, rollouts)
    await follow.start()  # a rollback while the trainer was down: rebased before recovery
    await recover(settings, driver, ingestor, js)
    roster = Roster(registry, settings.heartbeat_ttl_s, telemetry.registry)
    await nc.subscribe(subjects.HEARTBEAT_ALL, cb=roster.on_heartbeat)
    secagg = await start_secagg(
        settings, nc, registry, driver.sizes, roster.alive, telemetry.registry
    )
    log.info("trainer ready", extra={"models": ",".join(settings.models)})
    if rollouts is not None:  # a release the last run may have died before handing over
        rollouts.request_current(
            {m: b.version for m, b in books.items() if follow.serving(m) != b.version}
        )
    try:
        await asyncio.gather(
            ingestor.run(stop),
            keep_mirrored(js, registry, stop, replicas=settings.nats_replicas),
            run_rounds(
                settings,
                driver,
                contexts,
                js,
                roster,
                stop,
                rollouts,
                secagg,
                telemetry.outcomes,
                ingestor.backlog,
                follow,
            ),
            follow.run(stop),
            *([rollouts.run(stop)] if rollouts is not None else []),
        )
    finally:
        if secagg is not None:
            await secagg.stop()


def model_sizes(settings: TrainerSettings) -> dict[str, tuple[int, ...]]:
    """Each model's tensor sizes, in the order its updates are flattened."""
    return {
        m: tuple(sizes_from_layout(layout(get_spec(m).build_module()))) for m in settings.models
    }


def release_context(
    settings: TrainerSettings,
    model: str,
    signing: ed25519.Ed25519PrivateKey,
    federated: FederatedEval,
) -> ReleaseContext:
    """What closing a round of ``model`` needs; without an evaluation set of its own the
    trainer asks the edges to evaluate (``federated``)."""
    spec = get_spec(model)
    x_test, y_test = evaluation_data(spec) or (None, None)
    return ReleaseContext(
        spec,
        signing,
        settings.artifacts_dir,
        settings.gate_margin,
        x_test,
        y_test,
        replicas=settings.nats_replicas,
        federated=federated,
        gate_z=settings.gate_z,
    )


async def upload_released(js: JetStreamContext, settings: TrainerSettings) -> None:
    """Put every released version of every model into the models object store."""
    for m in settings.models:
        for v in released_versions(settings, m):
            directory = settings.artifacts_dir / m / str(v)
            await upload_version(js, m, v, directory, replicas=settings.nats_replicas)


async def start_ingestor(
    settings: TrainerSettings,
    js: JetStreamContext,
    recipient: RecipientPrivateKey,
    registry: RegistryFile,
    driver: RoundDriver,
    metrics_registry: CollectorRegistry,
) -> UpdateIngestor:
    """The updates consumer, bound, folding into ``driver``'s books."""
    ingestor = UpdateIngestor(
        js,
        recipient=recipient,
        edges=registry,
        rounds=driver,
        aggregator=driver,
        ledger=await UpdateLedger.open(js, replicas=settings.nats_replicas),
        metrics=IngestMetrics(metrics_registry),
        options=IngestOptions(
            max_update_bytes=settings.max_update_bytes, ack_wait_s=settings.updates_ack_wait_s
        ),
    )
    await ingestor.bind()
    return ingestor


async def recover(
    settings: TrainerSettings, driver: RoundDriver, ingestor: UpdateIngestor, js: JetStreamContext
) -> None:
    """After a restart: fold again what the ledger accepted into the open rounds, announce
    them, then handle the stream's backlog (updates sent while the trainer was down count
    before a deadline that passed meanwhile closes their round)."""
    for m, book in driver.books.items():
        target = driver.target(m)
        if target is not None and book.current is not None:
            refolded = await ingestor.refold(target, set(book.current.folded))
            if refolded:
                driver.save(m)
                log.info("refolded after restart", extra={"model": m, "updates": len(refolded)})
            await announce(js, book, settings.nats_replicas)
    caught_up = await ingestor.catch_up()
    if caught_up:
        log.info("caught up with the updates stream", extra={"messages": caught_up})


def federated_runner(
    settings: TrainerSettings,
    nc: NATS,
    signing: ed25519.Ed25519PrivateKey,
    registry: RegistryFile,
) -> FederatedEval:
    """Federated evaluation as the settings bound it, signed with the version-signing key
    and counting reports from enrolled edges only."""
    policy = FedEvalPolicy(
        min_edges=settings.fed_eval_min_edges,
        min_samples=settings.fed_eval_min_samples,
        max_samples_per_edge=settings.fed_eval_max_samples_per_edge,
        timeout_s=settings.fed_eval_timeout_s,
    )

    async def run(
        model: str, round_no: int, candidate: NDArray[Any], serving: NDArray[Any]
    ) -> FedEvalResult:
        return await federated_evaluate(
            nc, signing, registry.active_keys, model, round_no, candidate, serving, policy
        )

    return run


async def start_secagg(
    settings: TrainerSettings,
    nc: NATS,
    registry: RegistryFile,
    sizes: dict[str, tuple[int, ...]],
    alive: Callable[[], list[str]] | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> SecAggCoordinator | None:
    """The secure-round coordinator, listening to the edges (None: secure aggregation off);
    ``alive`` lists the edges heard from lately (a silent edge is a dropout); its failures
    and culprits are counted in ``metrics_registry``."""
    configs = secagg_configs(settings)
    if not configs:
        return None
    dims = {m: sum(sizes[m]) for m in configs}

    async def send(subject: str, data: bytes) -> None:
        await nc.publish(subject, data)

    timing = SecAggTiming(settings.secagg_phase_timeout_s, settings.secagg_resend_s)
    metrics = None if metrics_registry is None else SecAggMetrics(metrics_registry, configs)
    secagg = SecAggCoordinator(send, registry, configs, dims, timing, alive, metrics)
    await nc.subscribe(subjects.SECAGG_FROM_ALL, cb=secagg.on_message)
    log.info("secure aggregation on", extra={"models": ",".join(sorted(configs))})
    return secagg
