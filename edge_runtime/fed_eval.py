"""Federated evaluation on the edge: score the trainer's candidate on the local held-out split.

The edge answers a signed :class:`fedcore.fed_eval.EvalRequest` on
``fedgate.evaluate.<model>`` with an :class:`fedcore.fed_eval.EvalReport` signed with its
identity key: the number of its held-out samples (the split fine-tuning never trains on,
:func:`edge_runtime.spool.is_holdout`) and the sums of the task's per-sample metric and
loss for the candidate and the serving parameters. Only these five numbers leave the
edge. A request not signed by the trainer's key, stale, for a model this edge does not
serve, or with malformed parameters gets no answer (logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from numpy.typing import NDArray

from edge_runtime.spool import Spool
from fedcore import fed_eval
from fedcore.modelrun import predict
from fedcore.models import get_spec
from fedcore.params import flatten, load_flat
from fedcore.spec import Feeds, ModelSpec
from fedcore.task import sample_scores
from fedcore.wire import WireError

log = logging.getLogger(__name__)

Sums = tuple[float, float]  # metric sum, loss sum


def score(spec: ModelSpec, params: NDArray[Any], x: Feeds, y: NDArray[Any]) -> Sums:
    """The sums of the task's per-sample metric and loss of ``params`` on (x, y)."""
    import torch

    from fedcore.task import torch_loss

    if len(y) == 0:
        return 0.0, 0.0
    module = spec.build_module()
    load_flat(module, params)
    out = predict(spec, module, x)[spec.target.name]
    metric = float(sample_scores(spec.task, out, y).sum())
    loss = float(torch_loss(spec.task, torch.from_numpy(out), torch.from_numpy(y)).sum())
    return metric, loss


class EvalResponder:
    """Answers the trainer's evaluation requests for the models this edge spools."""

    def __init__(
        self,
        edge_id: str,
        spools: Mapping[str, Spool],
        signer: ed25519.Ed25519PrivateKey,
        trainer: ed25519.Ed25519PublicKey,
        holdout_fraction: float,
    ) -> None:
        self.edge_id = edge_id
        self.spools = dict(spools)
        self.signer = signer
        self.trainer = trainer
        self.holdout_fraction = holdout_fraction
        self._subs: list[Subscription] = []

    async def start(self, nc: NATS) -> None:
        for model in self.spools:
            self._subs.append(await nc.subscribe(fed_eval.subject(model), cb=self._on_msg))

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    def evaluate(self, request: fed_eval.EvalRequest) -> fed_eval.EvalReport:
        """This edge's report for a verified request (blocking: torch)."""
        spec = get_spec(request.model)
        size = flatten(spec.build_module()).size
        candidate = fed_eval.unpack(request.candidate, size)
        serving = fed_eval.unpack(request.serving, size)
        data = self.spools[request.model].labelled(spec, self.holdout_fraction)
        c_sum, c_loss = score(spec, candidate, data.x_holdout, data.y_holdout)
        s_sum, s_loss = score(spec, serving, data.x_holdout, data.y_holdout)
        report = fed_eval.EvalReport(
            edge_id=self.edge_id,
            model=request.model,
            round=request.round,
            nonce=request.nonce,
            count=len(data.y_holdout),
            candidate_sum=c_sum,
            serving_sum=s_sum,
            candidate_loss_sum=c_loss,
            serving_loss_sum=s_loss,
        )
        return report.signed(self.signer)

    async def handle(self, data: bytes) -> fed_eval.EvalReport | None:
        """The report for one request message, or None (no answer)."""
        try:
            request = fed_eval.EvalRequest.decode(data)
        except WireError as exc:
            log.warning("dropped evaluation request: %s", exc)
            return None
        if request.model not in self.spools:
            return None
        problem = request.verify(self.trainer)
        if problem is not None:
            log.warning("dropped evaluation request: %s", problem, extra={"model": request.model})
            return None
        try:
            return await asyncio.to_thread(self.evaluate, request)
        except ValueError as exc:
            log.warning("dropped evaluation request: %s", exc, extra={"model": request.model})
            return None

    async def _on_msg(self, msg: Msg) -> None:
        try:
            report = await self.handle(msg.data)
            if report is not None and msg.reply:
                await msg.respond(report.encode())
                log.info(
                    "evaluated a candidate",
                    extra={"model": report.model, "round": report.round, "count": report.count},
                )
        except Exception:  # one bad request must not end the subscription
            log.exception("evaluation request failed", extra={"subject": msg.subject})
