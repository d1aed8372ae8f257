"""Secure aggregation (SecAgg+ family) as sans-IO code: the trainer learns only the sum.

Edges mask their clipped, quantised updates with pairwise masks (agreed over X25519 with
their neighbours in a sparse graph) and a self mask; Shamir shares of the mask material let
the trainer remove the masks of edges that drop out, and nothing more. See
``docs/secagg.md`` for the threat model and costs.

Modules: :mod:`config` (settings, compatibility check), :mod:`shamir`, :mod:`prg`
(AES-CTR masks), :mod:`graph`, :mod:`quantize`, :mod:`codec` and :mod:`messages` (wire
format), :mod:`agreement` (keys, signatures, share encryption), :mod:`client` (edge),
:mod:`server` (trainer).

Every refusal is a :class:`fedcore.errors.SecAggError` whose ``reason`` is one of
:data:`fedcore.errors.SecAggReason`:
``wrong-phase``, ``wrong-round``, ``unexpected-sender``, ``duplicate``, ``malformed``,
``oversize``, ``unknown-participant``, ``config-mismatch``, ``bad-signature``, ``bad-key``,
``bad-share``, ``below-threshold``, ``shape-mismatch``, ``non-finite``,
``inconsistent-survivors``, ``inconsistent-request``, ``disconnected-survivors``,
``both-shares-requested``, ``reconstruction-mismatch``, ``out-of-range``. Settings problems
(:class:`SecAggConfig`, :func:`check_compatible`) raise :class:`fedcore.errors.ConfigError`.
"""

from fedcore.secagg.client import ClientPhase, SecAggClient
from fedcore.secagg.config import RoundParams, SecAggConfig, check_compatible, round_params
from fedcore.secagg.messages import (
    AdvertBundle,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    PeerShare,
    RoundSetup,
    ShareBundle,
    ShareDelivery,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedcore.secagg.server import AggregateResult, SecAggServer, ServerPhase

__all__ = [
    "AdvertBundle",
    "AggregateResult",
    "ClientPhase",
    "EncryptedShare",
    "KeyAdvert",
    "MaskedInput",
    "PeerShare",
    "RoundParams",
    "RoundSetup",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "ServerPhase",
    "ShareBundle",
    "ShareDelivery",
    "SurvivorList",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_compatible",
    "round_params",
]
