"""A trainer and an edge on a real nats-server, for the update transport tests."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nats
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry

from edge_runtime.publisher import UpdatePublisher
from fedcore.envelope import seal_update
from fedcore.transport import StreamSpec
from fedgate.keys_cmd import KeyLayout, init_keys, revoke_edge
from tests.conftest import NatsServer
from trainer.bus import ensure_transport
from trainer.errors import UpdateRejected, UpdateRejectedReason
from trainer.ingest import AcceptedUpdate, IngestOptions, UpdateIngestor
from trainer.ingest_metrics import IngestMetrics
from trainer.ledger import UpdateLedger
from trainer.opener import RoundTarget
from trainer.registry import RegistryFile

SIZES = (40, 24)
DIM = sum(SIZES)
BASE_DIGEST = hashlib.sha256(b"digits v3").hexdigest()
TARGET = RoundTarget("digits", 5, 3, BASE_DIGEST, SIZES)


@dataclass
class SumAggregator:
    """Sums what it folds; refuses with ``refuse`` (a reason) when set, as the trainer's
    aggregator does: by raising :class:`UpdateRejected`."""

    total: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(DIM, dtype=np.float64))
    folded: list[str] = field(default_factory=list)
    refuse: UpdateRejectedReason | None = None

    def fold(self, update: AcceptedUpdate) -> None:
        if self.refuse is not None:
            raise UpdateRejected(self.refuse, "refused by the test aggregator")
        self.total += update.vector
        self.folded.append(update.header.update_id)


@dataclass
class Rounds:
    current: RoundTarget | None = TARGET

    def target(self, model: str) -> RoundTarget | None:
        return self.current if self.current and self.current.model == model else None


@dataclass
class Keys:
    layout: KeyLayout
    trainer: x25519.X25519PrivateKey
    edges: dict[str, ed25519.Ed25519PrivateKey]


def make_keys(root: Path) -> Keys:
    """edge-1 and edge-3 enrolled, edge-3 revoked; edge-2 has a key but is not enrolled."""
    from fedcore.keys import generate_ed25519, load_ed25519, load_x25519

    layout = init_keys(root, ["edge-1", "edge-3"])
    revoke_edge(layout, "edge-3")
    edges = {e: load_ed25519(layout.edge_key(e)) for e in ("edge-1", "edge-3")}
    edges["edge-2"] = generate_ed25519(root / "edge-2.key")
    return Keys(layout, load_x25519(layout.hpke_key), edges)


def seal(
    keys: Keys,
    payload: bytes | npt.NDArray[np.float32],
    *,
    edge: str = "edge-1",
    signer: ed25519.Ed25519PrivateKey | None = None,
    recipient: x25519.X25519PublicKey | None = None,
    target: RoundTarget = TARGET,
    **fields: object,
) -> tuple[str, bytes]:
    """(update id, envelope) of ``payload`` for ``target`` unless ``fields`` say otherwise."""
    data = payload.astype("<f4").tobytes() if isinstance(payload, np.ndarray) else payload
    args: dict[str, object] = {
        "model": target.model,
        "round": target.round,
        "base_version": target.base_version,
        "base_digest": target.base_digest,
        "num_samples": 50,
    }
    args.update(fields)
    header, envelope = seal_update(
        data,
        recipient=recipient or keys.trainer.public_key(),
        signer=signer or keys.edges[edge],
        edge_id=edge,
        **args,  # type: ignore[arg-type]
    )
    return header.update_id, bytes(envelope)


@dataclass
class Bus:
    trainer_nc: NATS
    edge_nc: NATS
    keys: Keys
    ingestor: UpdateIngestor
    aggregator: SumAggregator
    rounds: Rounds
    ledger: UpdateLedger
    metrics: CollectorRegistry
    publisher: UpdatePublisher

    def rejected(self, reason: str) -> float:
        value = self.metrics.get_sample_value(
            "fedgate_trainer_updates_rejected_total", {"reason": reason}
        )
        return value or 0.0

    def accepted(self) -> float:
        return self.metrics.get_sample_value("fedgate_trainer_updates_accepted_total") or 0.0

    def new_ingestor(self, aggregator: SumAggregator, options: IngestOptions) -> UpdateIngestor:
        """Another trainer process on the same durable consumer and ledger."""
        return UpdateIngestor(
            self.trainer_nc.jetstream(),
            recipient=self.keys.trainer,
            edges=RegistryFile(self.keys.layout.registry),
            rounds=self.rounds,
            aggregator=aggregator,
            ledger=self.ledger,
            metrics=IngestMetrics(CollectorRegistry()),
            options=options,
        )


@asynccontextmanager
async def open_bus(
    server: NatsServer, root: Path, options: IngestOptions | None = None
) -> AsyncIterator[Bus]:
    keys = make_keys(root)
    trainer_nc = await nats.connect(server.url, user="trainer", password=server.users["trainer"])
    edge_nc = await nats.connect(server.url, user="edge-1", password=server.users["edge-1"])
    try:
        js = trainer_nc.jetstream()
        await ensure_transport(js, StreamSpec(max_msg_size=trainer_nc.max_payload))
        ledger = await UpdateLedger.open(js)
        metrics = CollectorRegistry()
        aggregator, rounds = SumAggregator(), Rounds()
        ingestor = UpdateIngestor(
            js,
            recipient=keys.trainer,
            edges=RegistryFile(keys.layout.registry),
            rounds=rounds,
            aggregator=aggregator,
            ledger=ledger,
            metrics=IngestMetrics(metrics),
            options=options or IngestOptions(ack_wait_s=1.0, fetch_timeout_s=0.5),
        )
        await ingestor.bind()
        publisher = UpdatePublisher.for_connection(edge_nc, ack_timeout_s=2.0)
        yield Bus(
            trainer_nc, edge_nc, keys, ingestor, aggregator, rounds, ledger, metrics, publisher
        )
    finally:
        await edge_nc.close()
        await trainer_nc.close()


def trainer_env(
    root: Path, keys: KeyLayout, nats_url: str, password_file: Path, **settings: str
) -> dict[str, str]:
    """The environment of a test trainer process: the caller's ``FEDGATE_*`` dropped, data
    under ``root/trainer``, a short bootstrap, FedAvg, 3 updates per round, a gate that
    releases anything; ``settings`` (names without the ``FEDGATE_TRAINER_`` prefix) win."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    values = {
        "NATS_URL": nats_url,
        "NATS_USER": "trainer",
        "NATS_PASSWORD_FILE": str(password_file),
        "DATA_DIR": str(root / "trainer"),
        "SIGNING_KEY_FILE": str(keys.signing_key),
        "HPKE_PRIVATE_KEY_FILE": str(keys.hpke_key),
        "EDGE_REGISTRY_FILE": str(keys.registry),
        "BOOTSTRAP_EPOCHS": "2",
        "STRATEGY": "fedavg",
        "STRATEGY_OPTIONS": "{}",
        "MIN_UPDATES": "3",
        "ROUND_DEADLINE_S": "120",
        "GATE_MARGIN": "1.0",
        "ROUND_INTERVAL_S": "0",
    } | settings
    return env | {f"FEDGATE_TRAINER_{k}": v for k, v in values.items()}
