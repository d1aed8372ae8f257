"""Drives secure-aggregation rounds in memory, every message through its byte encoding."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.secagg import (
    AdvertBundle,
    AggregateResult,
    KeyAdvert,
    MaskedInput,
    RoundSetup,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    ShareBundle,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)

T = TypeVar("T")
STEPS = ["advert", "shares", "masked", "sign", "unmask"]


def wire(msg: Any, cls: type[T]) -> T:
    """Encode and decode ``msg``, checking the encoding is canonical and lossless."""
    data = msg.to_bytes()
    back: T = cls.from_bytes(data)  # type: ignore[attr-defined]
    assert back.to_bytes() == data  # type: ignore[attr-defined]
    assert back == msg
    return back


@dataclass
class Cohort:
    names: list[str]
    identities: dict[str, ed25519.Ed25519PrivateKey]
    enrolled: dict[str, ed25519.Ed25519PublicKey]

    @classmethod
    def make(cls, n: int) -> Cohort:
        names = [f"edge-{i:03d}" for i in range(n)]
        ids = {e: ed25519.Ed25519PrivateKey.generate() for e in names}
        return cls(names, ids, {e: k.public_key() for e, k in ids.items()})

    def clients(self, config: SecAggConfig) -> dict[str, SecAggClient]:
        return {e: SecAggClient(e, self.identities[e], self.enrolled, config) for e in self.names}


@dataclass
class Dropouts:
    """Edges that stop answering before the named step (and stay silent after it)."""

    advert: Collection[str] = ()
    shares: Collection[str] = ()
    masked: Collection[str] = ()
    sign: Collection[str] = ()
    unmask: Collection[str] = ()

    def alive(self, step: str, edges: Collection[str]) -> list[str]:
        gone: set[str] = set()
        for name in STEPS[: STEPS.index(step) + 1]:
            gone |= set(getattr(self, name))
        return [e for e in edges if e not in gone]


Hook = Callable[[str, Any], Any]


def _unchanged(step: str, msg: Any) -> Any:
    return msg


class Simulation:
    """One round, stepped by the test; ``tamper(step, msg)`` may replace any message."""

    def __init__(
        self,
        cohort: Cohort,
        config: SecAggConfig,
        dim: int,
        drop: Dropouts | None = None,
        seed: int = 0,
        tamper: Hook = _unchanged,
        updates: Mapping[str, NDArray[Any]] | None = None,
    ) -> None:
        if updates is None:
            rng = np.random.default_rng(seed)  # test data only, never masks
            updates = {e: rng.normal(0, 0.05, dim).astype(np.float32) for e in cohort.names}
        self.updates = dict(updates)
        self.drop = drop or Dropouts()
        self.tamper = tamper
        self.server = SecAggServer(
            config, "model-a/round-1", cohort.enrolled, dim, bytes([seed]) * 32
        )
        self.clients = cohort.clients(config)
        self.names = cohort.names
        self.masked: dict[str, MaskedInput] = {}
        self.requests: dict[str, UnmaskRequest] = {}

    def _send(self, step: str, msg: Any, cls: type[T]) -> T:
        return wire(self.tamper(step, msg), cls)

    def to_masked_input(self) -> None:
        server, clients = self.server, self.clients
        setup = self._send("setup", server.setup, RoundSetup)
        for e in self.drop.alive("advert", self.names):
            server.receive_advert(self._send("advert", clients[e].advertise(setup), KeyAdvert))
        bundles = server.close_adverts()
        for e in self.drop.alive("shares", bundles):
            bundle = self._send("advert-bundle", bundles[e], AdvertBundle)
            server.receive_shares(self._send("shares", clients[e].share_keys(bundle), ShareBundle))
        deliveries = server.close_shares()
        for e in self.drop.alive("masked", deliveries):
            delivery = self._send("delivery", deliveries[e], ShareBundle)
            masked = clients[e].masked_input(delivery, self.updates[e])
            self.masked[e] = self._send("masked", masked, MaskedInput)
            server.receive_masked_input(self.masked[e])

    def to_unmask_requests(self) -> dict[str, UnmaskRequest]:
        self.to_masked_input()
        survivors = self._send("survivors", self.server.close_masked_inputs(), SurvivorList)
        for e in self.drop.alive("sign", survivors.survivors):
            sig = self.clients[e].sign_survivors(survivors)
            self.server.receive_survivor_signature(self._send("sign", sig, SurvivorSignature))
        self.requests = self.server.close_signatures()
        return self.requests

    def run(self) -> AggregateResult:
        self.to_unmask_requests()
        for e in self.drop.alive("unmask", self.requests):
            req = self._send("unmask-request", self.requests[e], UnmaskRequest)
            resp = self.clients[e].unmask(req)
            self.server.receive_unmask(self._send("unmask", resp, UnmaskResponse))
        return self.server.finish()

    def plain_quantized_sum(self, survivors: Collection[str]) -> NDArray[np.uint64]:
        """The sum of the survivors' quantised updates, in 64-bit integers."""
        total = np.zeros(self.server.setup.dim, dtype=np.uint64)
        for e in survivors:
            q = self.clients[e].quantized
            assert q is not None
            total += q.astype(np.uint64)
        return total


def run_round(
    cohort: Cohort, config: SecAggConfig, dim: int, drop: Dropouts | None = None, **kw: Any
) -> tuple[AggregateResult, Simulation]:
    sim = Simulation(cohort, config, dim, drop, **kw)
    return sim.run(), sim
