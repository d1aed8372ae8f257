"""The trainer side of a secure-aggregation round, as a sans-IO state machine.

Each phase has ``receive_*`` methods (one per incoming message, refusing wrong ones with
:class:`SecAggError` without disturbing the round) and a ``close_*`` method the driver
calls when everyone answered or the phase deadline passed; it returns the messages to send
next and raises ``below-threshold`` when too few edges are left. A masked input is added
to the running sum once all the neighbours that shared with its sender have sent theirs
(any of them may name the sender as a culprit: its share did not open); until then it is
held, so memory holds at most the inputs whose neighbourhood is still incomplete.
:meth:`finish` reconstructs the survivors' self-mask seeds and the dropped edges' mask
keys from the shares that agree with their commitments (naming the holders of wrong
ones), removes the masks, checks the sum is one the survivors could have produced
honestly, and returns the exact integer sum and its dequantised float sum.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from numpy.typing import NDArray

from fedcore.errors import SecAggError
from fedcore.secagg import agreement, shamir
from fedcore.secagg.config import SecAggConfig, round_params
from fedcore.secagg.graph import build_graph, is_connected
from fedcore.secagg.messages import (
    AdvertBundle,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    RoundSetup,
    ShareBundle,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedcore.secagg.prg import add_mask
from fedcore.secagg.quantize import check_aggregate, dequantize_sum


class ServerPhase(enum.Enum):
    """Which messages the server accepts now."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


@dataclass(frozen=True)
class AggregateResult:
    """The outcome of a round: exact integer sum and float sum of the survivors' updates."""

    int_sum: NDArray[np.uint32]
    float_sum: NDArray[np.float64]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    culprits: dict[str, str] = field(default_factory=dict)
    """Edges caught misbehaving, with why: excluded before the sum (a share its neighbour
    could not open: also in ``dropped``), or whose revealed shares were wrong (ignored)."""

    def mean(self) -> NDArray[np.float64]:
        """The unweighted mean update of the survivors."""
        return self.float_sum / len(self.survivors)


class SecAggServer:
    """The trainer's view of one round over the cohort ``enrolled`` (edge -> Ed25519 key)."""

    def __init__(
        self,
        config: SecAggConfig,
        round_id: str,
        enrolled: Mapping[str, ed25519.Ed25519PublicKey],
        dim: int,
        round_seed: bytes | None = None,
    ) -> None:
        if dim < 1:
            raise SecAggError("malformed", f"dim must be >= 1, got {dim}")
        people = tuple(sorted(enrolled))
        self.params = round_params(config, len(people))
        seed = round_seed if round_seed is not None else os.urandom(32)
        self.setup = RoundSetup(round_id, seed, people, dim, config)
        self._digest = self.setup.digest()
        self._enrolled = dict(enrolled)
        self.graph = build_graph(people, seed, self.params.neighbours)
        self._near = {e: frozenset(near) for e, near in self.graph.items()}
        self._x = {e: i + 1 for i, e in enumerate(people)}
        self._names = {i: e for e, i in self._x.items()}
        self.phase = ServerPhase.ADVERTISE
        self._adverts: dict[str, KeyAdvert] = {}
        self._bundles: dict[str, ShareBundle] = {}
        self._sum = np.zeros(dim, dtype="<u4")
        self._masked: set[str] = set()
        self._pending: dict[str, NDArray[np.uint32]] = {}  # not yet known to be honest
        self._unheard: dict[str, set[str]] = {}  # pending edge -> sharers yet to send
        self._excluded: dict[str, frozenset[str]] = {}  # edge -> senders it excluded
        self.culprits: dict[str, str] = {}
        self._survivors: tuple[str, ...] = ()
        self._survivor_payload = b""
        self._signatures: dict[str, SurvivorSignature] = {}
        self._requests: dict[str, UnmaskRequest] = {}
        self._seed_shares: dict[str, list[shamir.Share]] = {}
        self._key_shares: dict[str, list[shamir.Share]] = {}
        self._answered: set[str] = set()
        self._pair_keys: dict[tuple[str, str], bytes] = {}  # (survivor, dropped) -> key

    # -- helpers ---------------------------------------------------------------------

    def _in_phase(self, phase: ServerPhase, edge: str | None = None) -> None:
        if self.phase is not phase:
            raise SecAggError("wrong-phase", f"server is in {self.phase.value}", edge)

    def _expect(
        self, phase: ServerPhase, round_id: str, edge: str, allowed: Container[str]
    ) -> None:
        self._in_phase(phase, edge)
        if round_id != self.setup.round_id:
            raise SecAggError("wrong-round", f"message for round {round_id!r}", edge)
        if edge not in allowed:
            raise SecAggError("unexpected-sender", f"not expected in {phase.value}", edge)

    def threshold(self, edge: str) -> int:
        """Shares needed to reconstruct ``edge``'s secrets."""
        return self.params.shamir_threshold(len(self.graph[edge]))

    def _need(self, alive: int, what: str) -> None:
        if alive < self.params.min_survivors:
            raise SecAggError(
                "below-threshold",
                f"{alive} edges {what}, at least {self.params.min_survivors} needed",
            )

    # -- advertise -------------------------------------------------------------------

    def receive_advert(self, advert: KeyAdvert) -> None:
        """Accept an edge's key advertisement if its enrolled key signed it for this round."""
        self._expect(ServerPhase.ADVERTISE, advert.round_id, advert.edge, self._enrolled)
        if advert.edge in self._adverts:
            raise SecAggError("duplicate", "second key advertisement", advert.edge)
        agreement.verify_advert(advert, self._enrolled[advert.edge], self._digest)
        self._adverts[advert.edge] = advert

    def close_adverts(self) -> dict[str, AdvertBundle]:
        """Each advertiser's bundle of its advertised neighbours' adverts."""
        self._in_phase(ServerPhase.ADVERTISE)
        self._need(len(self._adverts), "advertised keys")
        self.phase = ServerPhase.SHARE
        return {
            u: AdvertBundle(
                self.setup.round_id,
                u,
                tuple(self._adverts[v] for v in self.graph[u] if v in self._adverts),
            )
            for u in self._adverts
        }

    # -- share keys ------------------------------------------------------------------

    def receive_shares(self, bundle: ShareBundle) -> None:
        """Accept an edge's encrypted shares: exactly one per advertised neighbour."""
        self._expect(ServerPhase.SHARE, bundle.round_id, bundle.edge, self._adverts)
        if bundle.edge in self._bundles:
            raise SecAggError("duplicate", "second share bundle", bundle.edge)
        expected = sorted(v for v in self.graph[bundle.edge] if v in self._adverts)
        got = sorted(s.recipient for s in bundle.shares)
        if got != expected or any(s.sender != bundle.edge for s in bundle.shares):
            raise SecAggError(
                "malformed", "shares must go exactly to the advertised neighbours", bundle.edge
            )
        self._bundles[bundle.edge] = bundle

    def close_shares(self) -> dict[str, ShareBundle]:
        """Route the shares: each edge that shared gets those addressed to it."""
        self._in_phase(ServerPhase.SHARE)
        self._need(len(self._bundles), "shared keys")
        self.phase = ServerPhase.MASKED_INPUT
        inbox: dict[str, list[EncryptedShare]] = {u: [] for u in self._bundles}
        for bundle in self._bundles.values():
            for item in bundle.shares:
                if item.recipient in inbox:
                    inbox[item.recipient].append(item)
        return {u: ShareBundle(self.setup.round_id, u, tuple(s)) for u, s in inbox.items()}

    # -- masked input ----------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Take an edge's masked input and the neighbours it excluded (their shares did
        not open): those are culprits, dropped from the round. An input is added to the
        running sum (modulo 2**32) once every neighbour that shared has sent its own, so
        no complaint about it can come any more; until then it waits."""
        self._expect(ServerPhase.MASKED_INPUT, msg.round_id, msg.edge, self._bundles)
        if msg.edge in self._masked:
            raise SecAggError("duplicate", "second masked input", msg.edge)
        if len(msg.values) != 4 * self.setup.dim:
            raise SecAggError(
                "shape-mismatch",
                f"{len(msg.values)} bytes, expected {4 * self.setup.dim}",
                msg.edge,
            )
        if not all(v in self._near[msg.edge] and v in self._bundles for v in msg.excluded):
            raise SecAggError("malformed", "excludes an edge that shared nothing", msg.edge)
        self._masked.add(msg.edge)
        self._excluded[msg.edge] = frozenset(msg.excluded)
        for v in msg.excluded:
            self.culprits.setdefault(v, f"its share to {msg.edge} did not open")
        self._pending[msg.edge] = np.frombuffer(msg.values, dtype="<u4")
        self._unheard[msg.edge] = {
            w for w in self.graph[msg.edge] if w in self._bundles and w not in self._masked
        }
        for u in [msg.edge, *self.graph[msg.edge]]:
            waiting = self._unheard.get(u)
            if waiting is not None:
                waiting.discard(msg.edge)
                if not waiting:
                    self._fold(u)

    def _fold(self, edge: str) -> None:
        """Add ``edge``'s held masked input to the sum, unless it is a culprit."""
        values = self._pending.pop(edge)
        del self._unheard[edge]
        if edge not in self.culprits:
            np.add(self._sum, values, out=self._sum)

    def masked_with(self, edge: str, peer: str) -> bool:
        """Whether ``edge``'s masked input holds its pairwise mask with ``peer``: ``peer``
        shared with it and it did not exclude ``peer``."""
        return (
            peer in self._bundles
            and peer in self._near[edge]
            and (peer not in self._excluded.get(edge, frozenset()))
        )

    def close_masked_inputs(self) -> SurvivorList:
        """The survivor list every survivor is asked to sign: the edges that sent masked
        inputs, less the culprits."""
        self._in_phase(ServerPhase.MASKED_INPUT)
        for u in list(self._pending):
            self._fold(u)
        survivors = self._masked - set(self.culprits)
        self._need(len(survivors), "sent masked inputs")
        if not is_connected(survivors, self.graph):
            raise SecAggError("disconnected-survivors", "the survivors' graph is disconnected")
        self._survivors = tuple(sorted(survivors))
        self._survivor_payload = agreement.survivor_payload(self._digest, self._survivors)
        self.phase = ServerPhase.CONSISTENCY
        return SurvivorList(self.setup.round_id, self._survivors)

    # -- consistency -----------------------------------------------------------------

    def receive_survivor_signature(self, msg: SurvivorSignature) -> None:
        """Accept a survivor's signature over the survivor list."""
        self._expect(ServerPhase.CONSISTENCY, msg.round_id, msg.edge, self._survivors)
        if msg.edge in self._signatures:
            raise SecAggError("duplicate", "second survivor signature", msg.edge)
        key = self._enrolled[msg.edge]
        if not agreement.survivors_signed(key, msg.signature, self._survivor_payload):
            raise SecAggError("bad-signature", "survivor list signature invalid", msg.edge)
        self._signatures[msg.edge] = msg

    def close_signatures(self) -> dict[str, UnmaskRequest]:
        """Per signer: its neighbours' signatures and which share of which peer to reveal."""
        self._in_phase(ServerPhase.CONSISTENCY)
        self._need(len(self._signatures), "signed the survivor list")
        survivors = set(self._survivors)
        dropped = set(self._dropped_keys())
        for u in sorted(survivors | dropped):
            if u in dropped and all(v in self._signatures for v in self._masked_by(u)):
                continue  # each survivor that masked with it can reveal that mask's key
            self._reconstructable(u, [c for c in self._signatures if self.masked_with(c, u)])
        self.phase = ServerPhase.UNMASK
        for c in self._signatures:
            near = self.graph[c]
            self._requests[c] = UnmaskRequest(
                self.setup.round_id,
                c,
                self._survivors,
                tuple(self._signatures[v] for v in near if v in self._signatures),
                tuple(v for v in near if v in survivors),
                tuple(v for v in near if v in dropped and self.masked_with(c, v)),
            )
        return dict(self._requests)

    def _masked_by(self, dropped: str) -> list[str]:
        """The survivors whose masked inputs hold a pairwise mask with ``dropped``."""
        return [u for u in self._survivors if self.masked_with(u, dropped)]

    def _dropped_keys(self) -> list[str]:
        """The edges that shared but are not survivors and with which a survivor masked:
        their mask keys are reconstructed to remove those masks."""
        gone = set(self._bundles) - set(self._survivors)
        return sorted(v for v in gone if any(self.masked_with(u, v) for u in self._survivors))

    def _reconstructable(self, edge: str, holders: Container[str]) -> None:
        have = sum(1 for v in self.graph[edge] if v in holders)
        if have < self.threshold(edge):
            raise SecAggError(
                "below-threshold",
                f"{have} of its neighbours remain, {self.threshold(edge)} shares needed",
                edge,
            )

    # -- unmask ----------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Accept an edge's revealed shares, exactly the ones it was asked for."""
        self._expect(ServerPhase.UNMASK, msg.round_id, msg.edge, self._requests)
        if msg.edge in self._answered:
            raise SecAggError("duplicate", "second unmask response", msg.edge)
        req = self._requests[msg.edge]
        seeds = tuple(s.peer for s in msg.self_mask_shares)
        keys = tuple(s.peer for s in msg.mask_key_shares)
        pairs = tuple(s.peer for s in msg.pair_keys)
        if seeds != req.self_mask_peers or keys != req.mask_key_peers or pairs != keys:
            raise SecAggError("malformed", "response does not match the request", msg.edge)
        if any(len(s.value) != 32 for s in msg.pair_keys):
            raise SecAggError("malformed", "a pairwise mask key is 32 bytes", msg.edge)
        x = self._x[msg.edge]
        parsed = [
            (self._seed_shares, s.peer, shamir.share_from_bytes(x, s.value))
            for s in msg.self_mask_shares
        ] + [
            (self._key_shares, s.peer, shamir.share_from_bytes(x, s.value))
            for s in msg.mask_key_shares
        ]
        for store, peer, share in parsed:
            store.setdefault(peer, []).append(share)
        for pair in msg.pair_keys:
            self._pair_keys[msg.edge, pair.peer] = pair.value
        self._answered.add(msg.edge)

    def _recover(self, kind: str, edge: str, check: Callable[[bytes], bool]) -> bytes:
        """``edge``'s secret from the revealed shares that agree with its commitment; the
        holders of shares off its polynomial become culprits (their shares are ignored)."""
        store = self._seed_shares if kind == "seed" else self._key_shares
        try:
            secret, wrong = shamir.recover(store.get(edge, []), self.threshold(edge), check)
        except SecAggError as exc:
            raise SecAggError(exc.reason, f"{kind}: {exc.detail}", edge) from None
        for x in wrong:
            holder = self._names[x]
            self.culprits.setdefault(holder, f"revealed a wrong {kind} share of {edge}")
        return secret

    def _seed(self, edge: str) -> bytes:
        commitment = self._adverts[edge].seed_commitment

        def check(seed: bytes) -> bool:
            return agreement.seed_commitment(self._digest, edge, seed) == commitment

        return self._recover("seed", edge, check)

    def _mask_key(self, edge: str) -> x25519.X25519PrivateKey:
        public = self._adverts[edge].mask_pk
        raw = self._recover("mask key", edge, lambda k: agreement.public_matches(k, public))
        return x25519.X25519PrivateKey.from_private_bytes(raw)

    def _pair_masks(self, dropped: str) -> dict[str, bytes]:
        """The keys of the pairwise masks between ``dropped`` and the survivors that added
        one: derived from its reconstructed mask key, or, when too few right shares of that
        came back (a culprit that gave most neighbours bad shares), as revealed by each of
        those survivors itself."""
        holders = self._masked_by(dropped)
        try:
            private = self._mask_key(dropped)
        except SecAggError:
            revealed = {u: self._pair_keys.get((u, dropped)) for u in holders}
            if any(key is None for key in revealed.values()):
                raise
            return {u: key for u, key in revealed.items() if key is not None}
        return {
            u: agreement.pair_mask_key(private, self._adverts[u].mask_pk, self._digest, dropped, u)
            for u in holders
        }

    def finish(self) -> AggregateResult:
        """Remove every mask and return the survivors' sum; ``below-threshold`` or
        ``reconstruction-mismatch`` if unable, ``out-of-range`` if the sum is one that
        the survivors could not have produced honestly (a wrapped or oversized input)."""
        self._in_phase(ServerPhase.UNMASK)
        total = self._sum.copy()
        scratch = np.empty_like(total)
        for u in self._survivors:
            key = agreement.self_mask_key(self._seed(u), self._digest, u)
            add_mask(total, key, -1, scratch)
        for v in self._dropped_keys():
            for u, pair in self._pair_masks(v).items():
                add_mask(total, pair, -1 if u < v else 1, scratch)
        self.phase = ServerPhase.DONE
        n = len(self._survivors)
        float_sum = dequantize_sum(total, n, self.params)
        check_aggregate(total, float_sum, n, self.params)
        dropped = tuple(sorted(set(self._bundles) - set(self._survivors)))
        return AggregateResult(total, float_sum, self._survivors, dropped, dict(self.culprits))
