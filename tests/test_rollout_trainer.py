"""The trainer's rollout requests, against a small HTTP server standing in for the gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from fedcore.keys import write_secret
from fedcore.process import free_port
from trainer.rollout_client import RolloutRequester, rollout_requester
from trainer.settings import TrainerSettings


class FakeGateway:
    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.seen: list[tuple[str, str, dict[str, object]]] = []  # (path, auth, body)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((request.path, request.headers.get("Authorization", ""), body))
        status, doc = self.answers.pop(0) if self.answers else (201, {"id": "r-000000000001"})
        return web.json_response(doc, status=status)


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    app = web.Application()
    app.router.add_post("/v1/models/{model}/rollouts", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def key(tmp_path: Path) -> Path:
    path = tmp_path / "admin.key"
    write_secret(path, "fgk_admin")
    return path


async def test_retries_on_conflict_and_sends_the_options(
    gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    fake, url = gateway
    fake.answers = [
        (409, {"error": "rollout r-1 of digits version 2 is canary"}),
        (201, {"id": "r-2"}),
    ]
    requester = RolloutRequester(url, key(tmp_path), {"canary": 20}, retry_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(requester.run(stop))
    requester.request("digits", 3)
    for _ in range(100):
        if requester.accepted:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert requester.accepted == {"digits": "r-2"} and requester.pending == {}
    assert [s[2] for s in fake.seen] == [{"canary": 20, "version": 3}] * 2
    assert fake.seen[0][:2] == ("/v1/models/digits/rollouts", "Bearer fgk_admin")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, "version 3 of digits is not in the model store"),
        (409, "version 3 of digits is already the serving version"),
        (403, "needs 'admin'"),
    ],
)
async def test_final_refusals_are_dropped(
    gateway: tuple[FakeGateway, str], tmp_path: Path, status: int, error: str
) -> None:
    fake, url = gateway
    fake.answers = [(status, {"error": error})]
    requester = RolloutRequester(url, key(tmp_path))
    assert await requester.send("digits", 3) is True
    assert requester.accepted == {}


async def test_unreachable_gateway_and_newer_release(tmp_path: Path) -> None:
    requester = RolloutRequester(f"http://127.0.0.1:{free_port()}", key(tmp_path), timeout_s=1)
    assert await requester.send("digits", 2) is False  # logged, kept for later
    requester.request("digits", 2)
    requester.request("digits", 4)
    requester.request("digits", 3)  # older than what is waiting: ignored
    assert requester.pending == {"digits": 4}
    missing = RolloutRequester("http://127.0.0.1:9", tmp_path / "absent.key")
    assert await missing.send("digits", 2) is False


def test_configured_only_with_url_and_key(tmp_path: Path) -> None:
    base = {
        "data_dir": tmp_path,
        "signing_key_file": tmp_path / "k",
        "hpke_private_key_file": tmp_path / "h",
        "edge_registry_file": tmp_path / "r",
        "nats_user": "trainer",
        "nats_password_file": tmp_path / "p",
    }
    assert rollout_requester(TrainerSettings(**base)) is None
    assert rollout_requester(TrainerSettings(**base, gateway_url="http://gw")) is None
    made = rollout_requester(
        TrainerSettings(
            **base,
            gateway_url="http://gw/",
            admin_key_file=tmp_path / "a",
            rollout_options=json.loads('{"stages": [10, 50], "window_s": 60}'),
        )
    )
    assert made is not None and made.url == "http://gw"
    assert made.options == {"stages": [10, 50], "window_s": 60}


async def test_a_restarted_trainer_asks_again_for_its_current_versions(
    gateway: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    """Found by the chaos test on a fresh clone: the trainer was killed after releasing
    version 4 and before asking the gateway to roll it out. Restarted, it based every round
    on version 4, which no edge served; the edges refused every round, for ever. Now it asks
    again at start for each model's current version (a repeat is harmless)."""
    fake, url = gateway
    fake.answers = [
        (201, {"id": "r-4"}),
        (409, {"error": "version 1 ... already the serving version"}),
    ]
    requester = RolloutRequester(url, key(tmp_path), retry_s=0.05)
    requester.request_current({"digits": 4, "diabetes": 1})  # version 1 needs no rollout
    stop = asyncio.Event()
    task = asyncio.create_task(requester.run(stop))
    for _ in range(100):
        if requester.accepted:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert requester.accepted == {"digits": "r-4"}
    assert [(s[0], s[2]) for s in fake.seen] == [("/v1/models/digits/rollouts", {"version": 4})]
