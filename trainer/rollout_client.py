"""After a release, ask the gateway to roll the new version out (``POST .../rollouts``).

:class:`RolloutRequester` keeps the newest released version of each model that the
gateway has not accepted yet and sends it from a background task: right away, then again
every ``retry_s`` while the gateway answers 409 (another rollout of the model is still
running), 5xx or cannot be reached. A newer release replaces an older one still waiting.
A refusal that will not change by waiting (400, 401, 403, 404, or 409 because the version
already serves) is logged and dropped.
Nothing here can stop the trainer: every failure is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from fedcore.errors import FedgateError
from fedcore.keys import read_secret
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({400, 401, 403, 404, 422})
ALREADY_SERVING = "already the serving version"
"""The gateway's 409 for a version that needs no rollout (any other 409: try again)."""


class RolloutRequester:
    """Requests rollouts of released versions through the gateway's admin API."""

    def __init__(
        self,
        gateway_url: str,
        admin_key_file: Path,
        options: dict[str, Any] | None = None,
        *,
        retry_s: float = 10.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.url = gateway_url.rstrip("/")
        self.admin_key_file = admin_key_file
        self.options = dict(options or {})
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.pending: dict[str, int] = {}
        self.accepted: dict[str, str] = {}  # model -> id of the rollout the gateway started
        self._wake = asyncio.Event()

    def request(self, model: str, version: int) -> None:
        """Ask for a rollout of ``version`` (replaces an older version still waiting)."""
        if version > self.pending.get(model, 0):
            self.pending[model] = version
            self._wake.set()

    def withdraw(self, model: str) -> None:
        """Forget the release of ``model`` still waiting (the rounds were rebased on an
        older version: it descends from a version the fleet dropped)."""
        if self.pending.pop(model, None) is not None:
            log.warning("rollout request of %s withdrawn", model, extra={"model": model})

    def request_current(self, versions: Mapping[str, int]) -> None:
        """At start: ask again for every model's current version past the first. A trainer
        killed between releasing a version and handing it to the gateway would otherwise
        base every later round on a version no edge serves (edges refuse such rounds), for
        ever; asking again is harmless (the gateway returns the rollout it has, or answers
        that the version already serves)."""
        for model, version in versions.items():
            if version > 1:
                self.request(model, version)

    async def run(self, stop: asyncio.Event) -> None:
        """Send what is pending until ``stop``."""
        while not stop.is_set():
            self._wake.clear()
            for model, version in sorted(self.pending.items()):
                if await self.send(model, version) and self.pending.get(model) == version:
                    del self.pending[model]
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            timeout = self.retry_s if self.pending else None
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def send(self, model: str, version: int) -> bool:
        """One request; True when settled (accepted, or refused for good)."""
        body = {**self.options, "version": version}
        url = f"{self.url}/v1/models/{model}/rollouts"
        try:
            key = read_secret(self.admin_key_file)
        except (OSError, FedgateError) as exc:
            log.warning("rollout of %s version %d not requested: %s", model, version, exc)
            return False
        headers = {"Authorization": f"Bearer {key}"}
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=body, headers=headers) as resp,
            ):
                status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("gateway unreachable for the rollout of %s v%d: %r", model, version, exc)
            return False
        return self._answered(model, version, status, text)

    def _answered(self, model: str, version: int, status: int, text: str) -> bool:
        extra = {"model": model, "version": version, "status": status}
        if status in (200, 201):
            rollout_id = _field(text, "id")
            self.accepted[model] = rollout_id
            log.info("rollout %s of %s version %d started", rollout_id, model, version, extra=extra)
            return True
        if status in FINAL_STATUSES or (status == 409 and ALREADY_SERVING in text):
            log.error(
                "gateway refused the rollout of %s v%d: %s", model, version, text, extra=extra
            )
            return True
        log.warning(
            "rollout of %s v%d not started yet (%d: %s); trying again in %g s",
            model,
            version,
            status,
            _field(text, "error") or text[:200],
            self.retry_s,
            extra=extra,
        )
        return False


def _field(text: str, name: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return ""
    return str(doc.get(name, "")) if isinstance(doc, dict) else ""


def rollout_requester(settings: TrainerSettings) -> RolloutRequester | None:
    """The requester the settings call for; None when no gateway (or key) is configured."""
    if settings.gateway_url is None:
        return None
    if settings.admin_key_file is None:
        log.warning("gateway_url is set but admin_key_file is not: no rollouts requested")
        return None
    return RolloutRequester(settings.gateway_url, settings.admin_key_file, settings.rollout_options)
