"""The trainer's side of federated evaluation: ask the fleet, verify, combine.

:func:`federated_evaluate` sends one signed :class:`fedcore.fed_eval.EvalRequest` for a
model's candidate and serving parameters and gathers the edges' reports until
``policy.timeout_s``: a report counts only if it answers this request's nonce, comes from
an enrolled edge whose identity key verifies its signature, and is that edge's first.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from numpy.typing import NDArray

from fedcore import fed_eval
from fedcore.wire import WireError

log = logging.getLogger(__name__)

EdgeKeys = Callable[[], Mapping[str, ed25519.Ed25519PublicKey]]


async def federated_evaluate(
    nc: NATS,
    key: ed25519.Ed25519PrivateKey,
    edge_keys: EdgeKeys,
    model: str,
    round_no: int,
    candidate: NDArray[Any],
    serving: NDArray[Any],
    policy: fed_eval.FedEvalPolicy,
) -> fed_eval.FedEvalResult:
    """Both parameter vectors scored on the edges' held-out splits, combined by counts."""
    request = fed_eval.EvalRequest(
        model=model,
        round=round_no,
        nonce=secrets.token_hex(16),
        issued_ts=time.time(),
        candidate=fed_eval.pack(candidate),
        serving=fed_eval.pack(serving),
    ).signed(key)
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_reply(msg: Msg) -> None:
        replies.put_nowait(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(fed_eval.subject(model), request.encode(), reply=inbox)
        reports = await _gather(replies, request, edge_keys(), policy.timeout_s)
    finally:
        await sub.unsubscribe()
    result = fed_eval.combine(list(reports.values()), policy)
    log.info(
        "federated evaluation",
        extra={"model": model, "round": round_no, "edges": result.edges, "count": result.samples},
    )
    return result


async def _gather(
    replies: asyncio.Queue[bytes],
    request: fed_eval.EvalRequest,
    keys: Mapping[str, ed25519.Ed25519PublicKey],
    timeout_s: float,
) -> dict[str, fed_eval.EvalReport]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    reports: dict[str, fed_eval.EvalReport] = {}
    while len(reports) < len(keys) and (left := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(replies.get(), left)
        except TimeoutError:
            break
        try:
            report = fed_eval.EvalReport.decode(data)
        except WireError as exc:
            log.warning("dropped evaluation report: %s", exc)
            continue
        edge_key = keys.get(report.edge_id)
        wrong = (report.nonce, report.model, report.round) != (
            request.nonce,
            request.model,
            request.round,
        )
        if edge_key is None or wrong or not report.verify(edge_key):
            log.warning("dropped evaluation report", extra={"edge": report.edge_id})
            continue
        reports.setdefault(report.edge_id, report)
    return reports
