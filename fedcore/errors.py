"""The error hierarchy every fedgate package builds on.

Each package has one base class deriving from :class:`FedgateError`. Errors carry
structured fields (``reason`` and friends) so callers and metrics never parse messages.
"""

from __future__ import annotations


class FedgateError(Exception):
    """Base of every error fedgate raises on purpose."""


class ConfigError(FedgateError):
    """A setting is missing, malformed or inconsistent."""


class UnreachableError(FedgateError):
    """A server could not be reached (connection refused, timeout, TLS failure): the CLI's
    exit code 3, apart from a refusal by a server that answered (1)."""


class ProcessError(FedgateError):
    """A supervised process could not start, become ready or stop.

    ``name`` is the process (``nats-server``, ``tritonserver[edge-1]``), ``reason`` a short
    machine-readable cause (``binary-missing``, ``port-in-use``, ``exited``, ``timeout``).
    """

    def __init__(self, name: str, reason: str, detail: str) -> None:
        self.name = name
        self.reason = reason
        self.detail = detail
        super().__init__(f"{name}: {reason}: {detail}")


class ModelSpecError(FedgateError):
    """A model spec is inconsistent, or a tensor does not match it."""


class ArtifactError(FedgateError):
    """A model artifact is unsigned, tampered, or otherwise must not be loaded.

    ``reason`` is one of ``missing-manifest``, ``bad-signature``, ``digest-mismatch``,
    ``unlisted-file``, ``missing-file``, ``unsafe-path``, ``external-data``, ``malformed``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"artifact rejected ({reason}): {detail}")


class KeyFileError(FedgateError):
    """A key file is missing, unreadable, of the wrong type, or too widely readable."""


class SecAggError(FedgateError):
    """A secure-aggregation round cannot go on, or a message in it is refused.

    ``reason`` is a short machine-readable cause (``bad-signature``, ``both-shares-requested``,
    ``below-threshold``, ``malformed``, ...; the full list is in ``fedcore.secagg``), ``edge``
    the edge the problem is about when there is one.
    """

    def __init__(self, reason: str, detail: str, edge: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.edge = edge
        where = f" [edge {edge}]" if edge is not None else ""
        super().__init__(f"secure aggregation refused ({reason}){where}: {detail}")


class EnvelopeError(FedgateError):
    """A sealed model update is refused, or cannot be built.

    ``reason`` is one of :attr:`REASONS`, so logs and metrics never parse messages;
    ``detail`` says what exactly was wrong.
    """

    REASONS = frozenset(
        {
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
            "non-finite",
            "decode-error",
        }
    )

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown envelope rejection reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"update rejected ({reason}): {detail}")


class CodecError(EnvelopeError):
    """An update payload does not decode at its fixed dtype (``decode-error``), or holds
    non-finite values (``non-finite``)."""


class ResidualFileError(FedgateError):
    """A saved error-feedback residual cannot be used (not ``.npy``, wrong dtype or size,
    or non-finite values); the sender starts again from zeros."""


class TransportError(FedgateError):
    """An update could not be moved over the bus, or a transport message is malformed.

    ``reason`` is a short machine-readable cause: ``bad-pointer`` (a pointer message
    does not decode, or the object it names does not match it), ``object-missing``,
    ``bad-subject``, ``publish-failed``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"transport ({reason}): {detail}")


class EnrollmentError(FedgateError):
    """The edge registry is malformed, or an enrollment or revocation is refused.

    ``reason`` is one of ``malformed``, ``unknown-edge``, ``already-enrolled``,
    ``key-revoked``, ``io``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"edge registry ({reason}): {detail}")
