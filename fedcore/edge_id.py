"""Edge ids: the one validator, for every entrance that takes one.

An edge id is a lowercase DNS-label-like name (``edge-1``, ``store-0042``): it is a NATS
subject token, a NATS user, a certificate name, a KV key and a file name, so every
component (gateway, trainer, edge, broker configuration, CLI) checks it here and the
same strings pass everywhere.
"""

from __future__ import annotations

import hashlib
import re

EDGE_ID_PATTERN = "[a-z0-9][a-z0-9-]{0,62}"
"""1 to 63 of ``a-z``, ``0-9`` and ``-``, not starting with ``-`` (to embed in patterns)."""
EDGE_ID = re.compile(EDGE_ID_PATTERN)
"""Compiled :data:`EDGE_ID_PATTERN`; use ``fullmatch`` (or :func:`is_edge_id`)."""


def is_edge_id(value: object) -> bool:
    """Whether ``value`` is a string that is a valid edge id, all of it."""
    return type(value) is str and EDGE_ID.fullmatch(value) is not None


def check_edge_id(value: str) -> str:
    """``value`` if it is a valid edge id, else ``ValueError`` (pydantic validators turn
    it into a validation error) naming the pattern."""
    if not is_edge_id(value):
        raise ValueError(f"edge id {value!r} must match {EDGE_ID_PATTERN}")
    return value


def edge_id_from_node_name(name: str) -> str:
    """A valid edge id derived from a machine's name (Kubernetes: the node name).

    Lowercase; every run of characters other than letters and digits becomes one ``-``;
    no ``-`` at either end: ``ip-10-0-1-2.ec2.internal`` is ``ip-10-0-1-2-ec2-internal``.
    A result over 63 characters keeps its first 54 and ends in ``-`` and 8 hex digits of
    the name's SHA-256, so two long names stay two ids. The same name always gives the same
    id: compute it to enrol the machine (its NATS user and certificate are the id).
    """
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not base:
        raise ValueError(f"node name {name!r} has no letter or digit to make an edge id of")
    if len(base) > 63:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        base = base[:54].rstrip("-") + "-" + digest
    return check_edge_id(base)
