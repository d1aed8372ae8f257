"""Secure aggregation (fedcore.secagg) against plain aggregation of the same updates.

For n in {10, 50, 100} edges and d in {1e5, 1e6} float32 parameters, one full round is
simulated in this process: every edge in turn, then the trainer, each message encoded to
bytes and decoded again (encoding is counted on the sender, decoding on the receiver).
Two rounds per (n, d): no dropout, and 10% of the edges dropping after sharing their keys
(before their masked input), which is the trainer's expensive case: it must reconstruct
each dropped edge's mask key and regenerate its pairwise masks with every neighbour.

Times are CPU time of this process (``time.process_time``), so other load on the machine
distorts them less than wall time would. Columns (per edge figures are means over the
edges that took part in every step):

- ``k``/``t``: neighbours per edge and Shamir threshold; ``bits``: quantisation bits.
- ``edge ms``: CPU time of one edge for the whole protocol (clip, quantise, masks,
  Shamir, AES-GCM, signatures); ``edge KB up/down``: bytes it sends and receives.
- ``trainer s``: trainer time for the round (verify, route, sum, reconstruct, unmask);
  ``trainer MB in/out``.
- ``plain``: the same updates sent as raw float32 (``tobytes``) and summed by the
  trainer into a float64 accumulator: edge ms (encode), KB up, trainer s (decode + sum).
- ``max err``: largest |secure float sum - plain float64 sum| over the coordinates
  (quantisation error only; the integer sums are exact).

Encryption of the update in transit (the sealed envelope) is the same for both and left
out. A last pair of rows shows the price of a graph sized for 30% dropouts
(``expected_dropout=0.3``: every neighbourhood must keep a majority, so k grows to n - 1).
Run: ``.venv/bin/python benchmarks/secagg.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.secagg import (
    AdvertBundle,
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
CONFIG = SecAggConfig(clip_norm=1.0)


@dataclass
class Meter:
    """Seconds and bytes per party."""

    seconds: dict[str, float] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def time(self, party: str, fn: Callable[..., T], *args: Any) -> T:
        t0 = time.process_time()  # CPU time: steadier than wall time on a shared machine
        out = fn(*args)
        self.seconds[party] = self.seconds.get(party, 0.0) + time.process_time() - t0
        return out

    def send(self, sender: str, receiver: str, msg: Any, cls: type[T]) -> T:
        data = self.time(sender, msg.to_bytes)
        self.sent[sender] = self.sent.get(sender, 0) + len(data)
        self.received[receiver] = self.received.get(receiver, 0) + len(data)
        decoded: T = self.time(receiver, cls.from_bytes, data)  # type: ignore[attr-defined]
        return decoded


def make_update(i: int, d: int) -> NDArray[np.float32]:
    """Edge ``i``'s update: float32, L2 norm about 0.5 (inside the clipping bound)."""
    return np.random.default_rng(i).normal(0.0, 0.5 / np.sqrt(d), d).astype(np.float32)


def secure_round(
    names: list[str], ids: dict[str, Any], d: int, dropped: set[str], config: SecAggConfig
) -> tuple[Meter, Any, SecAggServer]:
    enrolled = {e: k.public_key() for e, k in ids.items()}
    m = Meter()
    server = SecAggServer(config, "bench/round-1", enrolled, d)
    clients = {e: SecAggClient(e, ids[e], enrolled, config) for e in names}
    S = "trainer"
    for e in names:
        setup = m.send(S, e, server.setup, RoundSetup)
        advert = m.send(e, S, m.time(e, clients[e].advertise, setup), KeyAdvert)
        m.time(S, server.receive_advert, advert)
    bundles = m.time(S, server.close_adverts)
    for e in names:
        bundle = m.send(S, e, bundles[e], AdvertBundle)
        shares = m.send(e, S, m.time(e, clients[e].share_keys, bundle), ShareBundle)
        m.time(S, server.receive_shares, shares)
    deliveries = m.time(S, server.close_shares)
    live = [e for e in names if e not in dropped]
    for i, e in enumerate(names):
        if e in dropped:
            continue
        delivery = m.send(S, e, deliveries[e], ShareBundle)
        update = make_update(i, d)
        masked = m.time(e, clients[e].masked_input, delivery, update)
        m.time(S, server.receive_masked_input, m.send(e, S, masked, MaskedInput))
    survivors = m.time(S, server.close_masked_inputs)
    for e in live:
        sig = m.time(e, clients[e].sign_survivors, m.send(S, e, survivors, SurvivorList))
        m.time(S, server.receive_survivor_signature, m.send(e, S, sig, SurvivorSignature))
    requests = m.time(S, server.close_signatures)
    for e in live:
        resp = m.time(e, clients[e].unmask, m.send(S, e, requests[e], UnmaskRequest))
        m.time(S, server.receive_unmask, m.send(e, S, resp, UnmaskResponse))
    result = m.time(S, server.finish)
    return m, result, server


def plain_round(names: list[str], d: int, dropped: set[str]) -> tuple[Meter, NDArray[np.float64]]:
    m = Meter()
    total = np.zeros(d, dtype=np.float64)
    for i, e in enumerate(names):
        if e in dropped:
            continue
        update = make_update(i, d)
        data = m.time(e, update.tobytes)
        m.sent[e] = len(data)
        m.time("trainer", lambda b: np.add(total, np.frombuffer(b, np.float32), out=total), data)
    return m, total


def row(n: int, d: int, drop_fraction: float, config: SecAggConfig = CONFIG) -> str:
    names = [f"edge-{i:03d}" for i in range(n)]
    ids = {e: ed25519.Ed25519PrivateKey.generate() for e in names}
    step = max(1, int(1 / drop_fraction)) if drop_fraction else 1
    dropped = set(names[::step][: round(n * drop_fraction)])
    m, result, server = secure_round(names, ids, d, dropped, config)
    p, plain_total = plain_round(names, d, dropped)
    live = [e for e in names if e not in dropped]
    edge_ms = 1e3 * np.mean([m.seconds[e] for e in live])
    up = np.mean([m.sent[e] for e in live]) / 1e3
    down = np.mean([m.received[e] for e in live]) / 1e3
    plain_ms = 1e3 * np.mean([p.seconds[e] for e in live])
    err = float(np.max(np.abs(result.float_sum - plain_total)))
    k = server.params.neighbours
    t = server.params.shamir_threshold(k)
    return (
        f"{n:>4} {d:>8.0e} {len(dropped):>4} {k:>3} {t:>3} {server.params.quant_bits:>4} |"
        f" {edge_ms:>8.1f} {up:>9.1f} {down:>8.1f} |"
        f" {m.seconds['trainer']:>9.3f} {m.received['trainer'] / 1e6:>7.2f}"
        f" {m.sent['trainer'] / 1e6:>7.3f} |"
        f" {plain_ms:>8.2f} {p.sent[live[0]] / 1e3:>8.1f} {p.seconds['trainer']:>9.3f} |"
        f" {err:>8.1e}"
    )


def main() -> None:
    print(__doc__.split("\n\n")[0])
    print(f"{'':32}| {'secure: per edge':^27} | {'secure: trainer':^25} | {'plain float32':^27} |")
    print(
        f"{'n':>4} {'d':>8} {'drop':>4} {'k':>3} {'t':>3} {'bits':>4} |"
        f" {'edge ms':>8} {'KB up':>9} {'KB down':>8} |"
        f" {'trainer s':>9} {'MB in':>7} {'MB out':>7} |"
        f" {'edge ms':>8} {'KB up':>8} {'trainer s':>9} | {'max err':>8}"
    )
    start = time.perf_counter()
    for d in (100_000, 1_000_000):
        for n in (10, 50, 100):
            for drop in (0.0, 0.1):
                print(row(n, d, drop), flush=True)
    print("graph sized for 30% dropouts (expected_dropout=0.3), 30% dropping after sharing keys:")
    sized = SecAggConfig(clip_norm=1.0, expected_dropout=0.3)
    for n in (50, 100):
        print(row(n, 1_000_000, 0.3, sized), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
