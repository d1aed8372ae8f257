"""The edge side of a secure-aggregation round, as a sans-IO state machine.

``advertise -> share_keys -> masked_input -> sign_survivors -> unmask``, each taking the
server's message and returning the edge's reply. Every step checks what the server sent
and raises :class:`SecAggError` instead of answering when it is wrong; after a refused
unmask request the edge answers nothing more this round. What an edge refuses:

- a setup whose settings differ from its own, or that lists an unenrolled edge;
- a neighbour's key advertisement not signed by that neighbour's enrolled key, or bound
  to another round (``bad-signature``);
- fewer neighbours than the Shamir threshold at any step (``below-threshold``);
- a neighbour's share that does not decrypt or check: not a refusal of the round, but
  that *sender* is excluded (named in the masked input; the server drops it);
- a survivor list without itself, below the minimum, or whose graph is disconnected;
- an unmask request that asks for both shares of one peer (``both-shares-requested``),
  that disagrees with the survivor list it signed, that lacks its neighbours' signatures
  on that list, or that comes a second time (``wrong-phase``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from numpy.typing import NDArray

from fedcore.errors import ConfigError, SecAggError
from fedcore.secagg import agreement, shamir
from fedcore.secagg.codec import Reader, Writer
from fedcore.secagg.config import RoundParams, SecAggConfig, round_params
from fedcore.secagg.graph import build_graph, is_connected
from fedcore.secagg.messages import (
    AdvertBundle,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    PeerShare,
    RoundSetup,
    ShareBundle,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedcore.secagg.prg import add_mask
from fedcore.secagg.quantize import FloatArray, quantize


class ClientPhase(enum.Enum):
    """Where an edge is in a round."""

    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    FAILED = "failed"


class _Round:
    """What the edge derives from a setup: digest, parameters, graph, share positions."""

    def __init__(self, setup: RoundSetup, edge: str) -> None:
        self.setup = setup
        self.digest = setup.digest()
        try:
            self.params: RoundParams = round_params(setup.config, len(setup.participants))
        except ConfigError as exc:
            raise SecAggError("config-mismatch", str(exc)) from None
        self.graph = build_graph(setup.participants, setup.round_seed, self.params.neighbours)
        self.x = {e: i + 1 for i, e in enumerate(setup.participants)}
        self.neighbours = self.graph[edge]
        self.threshold = self.params.shamir_threshold(len(self.neighbours))


class SecAggClient:
    """One edge in one round. ``enrolled`` maps every edge name to its Ed25519 public key."""

    def __init__(
        self,
        edge: str,
        identity: ed25519.Ed25519PrivateKey,
        enrolled: Mapping[str, ed25519.Ed25519PublicKey],
        config: SecAggConfig,
    ) -> None:
        self.edge = edge
        self._identity = identity
        self._enrolled = dict(enrolled)
        self._config = config
        self.phase = ClientPhase.NEW
        self._round: _Round | None = None
        self._keys = agreement.RoundKeys()
        self._peers: dict[str, KeyAdvert] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._pairs: dict[str, bytes] = {}
        self.excluded: dict[str, str] = {}  # neighbour -> why its share was not usable
        self._signed: tuple[str, ...] = ()
        self._signed_payload = b""
        self.quantized: NDArray[np.uint32] | None = None

    # -- helpers ---------------------------------------------------------------------

    def _expect(self, phase: ClientPhase, round_id: str, recipient: str | None = None) -> _Round:
        if self.phase is not phase or self._round is None:
            raise SecAggError("wrong-phase", f"edge is {self.phase.value}, not {phase.value}")
        if round_id != self._round.setup.round_id:
            raise SecAggError("wrong-round", f"message for round {round_id!r}")
        if recipient is not None and recipient != self.edge:
            raise SecAggError("malformed", f"message addressed to {recipient!r}")
        return self._round

    def _check_setup(self, setup: RoundSetup) -> None:
        people = setup.participants
        if list(people) != sorted(set(people)):
            raise SecAggError("malformed", "participants must be sorted and unique")
        if self.edge not in people:
            raise SecAggError("unknown-participant", "this edge is not in the round", self.edge)
        unknown = [e for e in people if e not in self._enrolled]
        if unknown:
            raise SecAggError("unknown-participant", f"not enrolled: {unknown}", unknown[0])
        if setup.config != self._config:
            raise SecAggError(
                "config-mismatch", f"server settings {setup.config} differ from {self._config}"
            )
        if setup.dim < 1 or len(setup.round_seed) != 32:
            raise SecAggError("malformed", "round needs dim >= 1 and a 32-byte seed")

    # -- steps -----------------------------------------------------------------------

    def advertise(self, setup: RoundSetup) -> KeyAdvert:
        """Check the setup and advertise this round's keys, signed."""
        if self.phase is not ClientPhase.NEW:
            raise SecAggError("wrong-phase", f"edge is {self.phase.value}, not new")
        self._check_setup(setup)
        rnd = _Round(setup, self.edge)
        self._round = rnd
        self.phase = ClientPhase.ADVERTISED
        return agreement.make_advert(
            self._identity, self._keys, setup.round_id, rnd.digest, self.edge
        )

    def _accept_adverts(self, rnd: _Round, bundle: AdvertBundle) -> None:
        for advert in bundle.adverts:
            if advert.edge not in rnd.neighbours or advert.edge in self._peers:
                raise SecAggError("malformed", "advert of a non-neighbour or twice", advert.edge)
            if advert.round_id != rnd.setup.round_id:
                raise SecAggError("wrong-round", "advert of another round", advert.edge)
            agreement.verify_advert(advert, self._enrolled[advert.edge], rnd.digest)
            self._peers[advert.edge] = advert
        if len(self._peers) < rnd.threshold:
            raise SecAggError(
                "below-threshold",
                f"{len(self._peers)} neighbours advertised, {rnd.threshold} needed",
            )

    def share_keys(self, bundle: AdvertBundle) -> ShareBundle:
        """Verify the neighbours' adverts; share seed and mask key with them, encrypted."""
        rnd = self._expect(ClientPhase.ADVERTISED, bundle.round_id, bundle.recipient)
        self.phase = ClientPhase.FAILED
        self._accept_adverts(rnd, bundle)
        holders = sorted(self._peers)
        xs = [rnd.x[v] for v in holders]
        seed_shares = shamir.split(self._keys.seed, xs, rnd.threshold)
        key_shares = shamir.split(agreement.raw_private(self._keys.masking), xs, rnd.threshold)
        out = []
        for v, bs, ks in zip(holders, seed_shares, key_shares, strict=True):
            plain = Writer().text(self.edge).text(v).blob(bs.y_bytes()).blob(ks.y_bytes())
            nonce, ct = agreement.encrypt_share(
                self._keys.cipher,
                self._peers[v].cipher_pk,
                rnd.digest,
                self.edge,
                v,
                plain.finish(),
            )
            out.append(EncryptedShare(self.edge, v, nonce, ct))
        self.phase = ClientPhase.SHARED
        return ShareBundle(rnd.setup.round_id, self.edge, tuple(out))

    def _open_share(self, rnd: _Round, item: EncryptedShare) -> None:
        """Decrypt and check one neighbour's share; ``bad-share``/``bad-key``/``malformed``
        when its sender sent something this edge cannot use."""
        sender = item.sender
        plain = agreement.decrypt_share(
            self._keys.cipher,
            self._peers[sender].cipher_pk,
            rnd.digest,
            sender,
            self.edge,
            item.nonce,
            item.ciphertext,
        )
        r = Reader(plain, "share plaintext")
        names = (r.text(), r.text())
        seed_y, key_y = r.blob(), r.blob()
        r.end()
        if names != (sender, self.edge):
            raise SecAggError("bad-share", f"share names {names}", sender)
        shamir.share_from_bytes(rnd.x[self.edge], seed_y)
        shamir.share_from_bytes(rnd.x[self.edge], key_y)
        pair = agreement.pair_mask_key(
            self._keys.masking, self._peers[sender].mask_pk, rnd.digest, self.edge, sender
        )
        self._held[sender] = (seed_y, key_y)
        self._pairs[sender] = pair

    def _open_shares(self, rnd: _Round, delivery: ShareBundle) -> None:
        """Keep every neighbour's share that opens; a sender whose share does not decrypt,
        parse or name the right pair, or whose advertised mask key is unusable, is excluded:
        no share of it is kept, no mask with it is added, and the masked input names it."""
        for item in delivery.shares:
            sender = item.sender
            known = sender in self._held or sender in self.excluded
            if sender not in self._peers or known or item.recipient != self.edge:
                raise SecAggError("malformed", "share from a non-neighbour, or twice", sender)
            try:
                self._open_share(rnd, item)
            except SecAggError as exc:
                self.excluded[sender] = exc.reason

    def masked_input(self, delivery: ShareBundle, update: FloatArray) -> MaskedInput:
        """Store the neighbours' shares; send the clipped, quantised, masked update."""
        rnd = self._expect(ClientPhase.SHARED, delivery.round_id, delivery.edge)
        self.phase = ClientPhase.FAILED
        self._open_shares(rnd, delivery)
        if len(self._held) < rnd.threshold:
            raise SecAggError(
                "below-threshold", f"{len(self._held)} neighbours shared, {rnd.threshold} needed"
            )
        if np.asarray(update).size != rnd.setup.dim:
            raise SecAggError(
                "shape-mismatch",
                f"update has {np.asarray(update).size} values, not {rnd.setup.dim}",
            )
        q = quantize(update, rnd.params)
        self.quantized = q
        masked = q.astype("<u4", copy=True)
        scratch = np.empty_like(masked)
        add_mask(
            masked, agreement.self_mask_key(self._keys.seed, rnd.digest, self.edge), 1, scratch
        )
        for v in sorted(self._held):
            add_mask(masked, self._pairs[v], 1 if self.edge < v else -1, scratch)
        self.phase = ClientPhase.MASKED
        excluded = tuple(sorted(self.excluded))
        return MaskedInput(rnd.setup.round_id, self.edge, masked.tobytes(), excluded)

    def _check_survivors(self, rnd: _Round, survivors: tuple[str, ...]) -> None:
        if list(survivors) != sorted(set(survivors)) or self.edge not in survivors:
            raise SecAggError("inconsistent-survivors", "survivors unsorted or without this edge")
        if any(s not in rnd.x for s in survivors):
            raise SecAggError("inconsistent-survivors", "survivor list names a non-participant")
        if len(survivors) < rnd.params.min_survivors:
            raise SecAggError(
                "below-threshold",
                f"{len(survivors)} survivors, at least {rnd.params.min_survivors} needed",
            )
        if not is_connected(survivors, rnd.graph):
            raise SecAggError(
                "disconnected-survivors", "unmasking would reveal the sum of a subgroup"
            )

    def sign_survivors(self, msg: SurvivorList) -> SurvivorSignature:
        """Check and sign the survivor list (once per round)."""
        rnd = self._expect(ClientPhase.MASKED, msg.round_id)
        self.phase = ClientPhase.FAILED
        self._check_survivors(rnd, msg.survivors)
        self._signed = msg.survivors
        self._signed_payload = agreement.survivor_payload(rnd.digest, msg.survivors)
        signature = agreement.sign_survivors(self._identity, self._signed_payload)
        self.phase = ClientPhase.SIGNED
        return SurvivorSignature(rnd.setup.round_id, self.edge, signature)

    def _check_request(self, rnd: _Round, req: UnmaskRequest) -> None:
        both = sorted(set(req.self_mask_peers) & set(req.mask_key_peers))
        if both:
            raise SecAggError(
                "both-shares-requested",
                f"asked for the self-mask and the mask-key share of {both}",
                both[0],
            )
        if req.survivors != self._signed:
            raise SecAggError("inconsistent-survivors", "survivors differ from the signed list")
        for peers, must_survive in ((req.self_mask_peers, True), (req.mask_key_peers, False)):
            if len(set(peers)) != len(peers):
                raise SecAggError("malformed", "a peer is asked for twice")
            for p in peers:
                if p not in self._held or (p in self._signed) != must_survive:
                    raise SecAggError(
                        "inconsistent-request", "request disagrees with the survivor list", p
                    )
        self._check_signatures(rnd, req)

    def _check_signatures(self, rnd: _Round, req: UnmaskRequest) -> None:
        valid: set[str] = set()
        for sig in req.signatures:
            ok = sig.edge in rnd.neighbours and sig.edge in self._signed
            if ok and agreement.survivors_signed(
                self._enrolled[sig.edge], sig.signature, self._signed_payload
            ):
                valid.add(sig.edge)
        if len(valid) < rnd.threshold:
            raise SecAggError(
                "inconsistent-survivors",
                f"{len(valid)} neighbours signed the survivor list, {rnd.threshold} needed",
            )

    def unmask(self, req: UnmaskRequest) -> UnmaskResponse:
        """Reveal, per peer, either its self-mask share or its mask-key share, never both;
        with a mask-key share (the peer dropped), also the key of this edge's pairwise
        mask with that peer, which the server could derive from the peer's key anyway."""
        rnd = self._expect(ClientPhase.SIGNED, req.round_id, req.recipient)
        self.phase = ClientPhase.FAILED
        self._check_request(rnd, req)
        seeds = tuple(PeerShare(p, self._held[p][0]) for p in req.self_mask_peers)
        keys = tuple(PeerShare(p, self._held[p][1]) for p in req.mask_key_peers)
        pairs = tuple(PeerShare(p, self._pairs[p]) for p in req.mask_key_peers)
        self.phase = ClientPhase.DONE
        return UnmaskResponse(rnd.setup.round_id, self.edge, seeds, keys, pairs)
