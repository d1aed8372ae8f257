"""The error hierarchy every fedgate package builds on.

Each package has one base class deriving from :class:`FedgateError`. Errors that say *why*
derive from :class:`ReasonedError`: a machine-readable ``reason`` out of a closed set the
class declares as a ``Literal`` type, and a human ``detail``. mypy checks that every raise
site passes a declared reason; callers and metrics never parse messages.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints

R = TypeVar("R", bound=str)


class FedgateError(Exception):
    """Base of every error fedgate raises on purpose."""


def reasons_of(declared: Any) -> frozenset[str]:
    """The strings of a ``Literal[...]`` reason type (nested Literals flatten)."""
    if get_origin(declared) is not Literal:
        raise TypeError(f"{declared!r} is not a Literal type")
    return frozenset(get_args(declared))


class ReasonedError(FedgateError, Generic[R]):
    """An error with a declared ``reason`` and a human ``detail``.

    A subclass names its reasons once, as the type argument:
    ``class ArtifactError(ReasonedError[ArtifactReason])`` with
    ``ArtifactReason = Literal[...]``; a subclass of a reasoned class narrows them by
    annotating ``reason`` in its own ``__init__``. :attr:`REASONS` is that set at run time
    (for metrics labels and checks), and a reason outside it is a ``ValueError``.
    ``TEMPLATE`` is the message (``{reason}`` and ``{detail}``).
    """

    REASONS: ClassVar[frozenset[str]] = frozenset()
    TEMPLATE: ClassVar[str] = "{reason}: {detail}"

    def __init__(self, reason: R, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"{type(self).__name__}: undeclared reason {reason!r}")
        self.reason: R = reason
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        return self.TEMPLATE.format(reason=self.reason, detail=self.detail)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = _declared_reasons(cls)
        if declared is not None:
            cls.REASONS = declared


def _declared_reasons(cls: type) -> frozenset[str] | None:
    """The Literal a class declares: the ``reason`` of its own ``__init__``, else its
    reasoned base's type argument; None when it declares none (it inherits them)."""
    init = cls.__dict__.get("__init__")
    if init is not None:
        hint = get_type_hints(init).get("reason")
        if get_origin(hint) is Literal:
            return reasons_of(hint)
    for base in cls.__dict__.get("__orig_bases__", ()):
        args = get_args(base)
        if args and get_origin(args[0]) is Literal:
            return reasons_of(args[0])
    return None


class ConfigError(FedgateError):
    """A setting is missing, malformed or inconsistent."""


class UnreachableError(FedgateError):
    """A server could not be reached (connection refused, timeout, TLS failure): the CLI's
    exit code 3, apart from a refusal by a server that answered (1)."""


ProcessReason = Literal["binary-missing", "port-in-use", "exited", "timeout", "orphans"]


class ProcessError(ReasonedError[ProcessReason]):
    """A supervised process could not start, become ready or stop.

    ``name`` is the process (``nats-server``, ``tritonserver[edge-1]``), ``reason`` a short
    machine-readable cause (``binary-missing``, ``port-in-use``, ``exited``, ``timeout``,
    ``orphans``).
    """

    def __init__(self, name: str, reason: ProcessReason, detail: str) -> None:
        self.name = name
        super().__init__(reason, detail)

    def _message(self) -> str:
        return f"{self.name}: {self.reason}: {self.detail}"


class ModelSpecError(FedgateError):
    """A model spec is inconsistent, or a tensor does not match it."""


ArtifactReason = Literal[
    "missing-manifest",
    "bad-signature",
    "digest-mismatch",
    "unlisted-file",
    "missing-file",
    "unsafe-path",
    "external-data",
    "malformed",
    "exists",
]


class ArtifactError(ReasonedError[ArtifactReason]):
    """A model artifact is unsigned, tampered, or otherwise must not be loaded
    (``reason``: one of :data:`ArtifactReason`)."""

    TEMPLATE = "artifact rejected ({reason}): {detail}"


class KeyFileError(FedgateError):
    """A key file is missing, unreadable, of the wrong type, or too widely readable."""


SecAggReason = Literal[
    "wrong-phase",
    "wrong-round",
    "unexpected-sender",
    "duplicate",
    "malformed",
    "oversize",
    "unknown-participant",
    "config-mismatch",
    "bad-signature",
    "bad-key",
    "bad-share",
    "below-threshold",
    "shape-mismatch",
    "non-finite",
    "inconsistent-survivors",
    "inconsistent-request",
    "disconnected-survivors",
    "both-shares-requested",
    "reconstruction-mismatch",
    "out-of-range",
]


class SecAggError(ReasonedError[SecAggReason]):
    """A secure-aggregation round cannot go on, or a message in it is refused.

    ``reason`` is one of :data:`SecAggReason`; ``edge`` the edge the problem is about when
    there is one.
    """

    def __init__(self, reason: SecAggReason, detail: str, edge: str | None = None) -> None:
        self.edge = edge
        super().__init__(reason, detail)

    def _message(self) -> str:
        where = f" [edge {self.edge}]" if self.edge is not None else ""
        return f"secure aggregation refused ({self.reason}){where}: {self.detail}"


CodecReason = Literal["decode-error", "non-finite"]
EnvelopeReason = Literal[
    "malformed",
    "truncated",
    "oversize",
    "unsupported-suite",
    "unknown-edge",
    "bad-signature",
    "decrypt-failed",
    "wrong-model",
    "wrong-round",
    "stale-round",
    "base-mismatch",
    CodecReason,
]


class EnvelopeError(ReasonedError[EnvelopeReason]):
    """A sealed model update is refused, or cannot be built.

    ``reason`` is one of :attr:`REASONS` (:data:`EnvelopeReason`), so logs and metrics
    never parse messages; ``detail`` says what exactly was wrong.
    """

    TEMPLATE = "update rejected ({reason}): {detail}"


class CodecError(EnvelopeError):
    """An update payload does not decode at its fixed dtype (``decode-error``), or holds
    non-finite values (``non-finite``)."""

    reason: CodecReason

    def __init__(self, reason: CodecReason, detail: str) -> None:
        super().__init__(reason, detail)


class ResidualFileError(FedgateError):
    """A saved error-feedback residual cannot be used (not ``.npy``, wrong dtype or size,
    or non-finite values); the sender starts again from zeros."""


TransportReason = Literal["bad-pointer", "object-missing", "bad-subject", "publish-failed"]


class TransportError(ReasonedError[TransportReason]):
    """An update could not be moved over the bus, or a transport message is malformed.

    ``reason`` is a short machine-readable cause: ``bad-pointer`` (a pointer message
    does not decode, or the object it names does not match it), ``object-missing``,
    ``bad-subject``, ``publish-failed``.
    """

    TEMPLATE = "transport ({reason}): {detail}"


EnrollmentReason = Literal["malformed", "unknown-edge", "already-enrolled", "key-revoked", "io"]


class EnrollmentError(ReasonedError[EnrollmentReason]):
    """The edge registry is malformed, or an enrollment or revocation is refused.

    ``reason`` is one of ``malformed``, ``unknown-edge``, ``already-enrolled``,
    ``key-revoked``, ``io``.
    """

    TEMPLATE = "edge registry ({reason}): {detail}"
