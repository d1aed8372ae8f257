"""Chaos: SIGKILL each kind of process of a running stack under load, and measure.

One run starts ``fedgate up`` (nats-server, trainer, ``--edges`` edge runtimes each with
its tritonserver, the gateway; it restarts a service that exits) with ``--set`` settings
for short rounds (:func:`chaos_sets`): edges take labels from
the load's feedback, fine-tune at once (the idle thresholds are lifted so that training
runs under load) and send updates; a round closes when every invited edge sent one or at
a 30 s deadline. A bounded async load (``--clients`` clients, loopback, each request with
an id and its true label as feedback) runs through the gateway the whole time. Then, in
turn, one SIGKILL each:

- ``tritonserver``: edge-1's Triton and its python-backend stub (the edge runtime restarts it);
- ``edge runtime``: edge-2's runtime process (its Triton follows it; the launcher restarts it);
- ``trainer``: while a round is open and holds at least one accepted update;
- ``nats-server``: restarted on the same port and store;
- ``gateway``: restarted on the same port.

Per fault: the requests from the kill until everything was back (in flight at the kill
included), how many failed (5xx, 4xx or no answer); "serving back": every edge ready in
the gateway's fleet and serving again (a 200 from it, sent after the kill); "all back":
that and a round opened after the kill closed (released or held) with an update of every
edge in it, so every edge learns again and rounds progress (a round takes a rollout's staging
plus training, about 25 s here). At the end, every update the
edges' logs say JetStream acknowledged is looked up in the trainer's ledger and rounds:
counted once, or late (acknowledged after its round had stopped taking updates, or
within ``RACE_S`` before), never lost or counted twice.

Targets (exit 1 if one is missed): failed requests at most 1% for the edge faults and
for the trainer and NATS (the inference path needs neither); everything back within
``--recover-s``; no update lost or counted twice. A gateway kill fails the requests in
flight and those sent until it is back (a single local gateway; ``--gateways`` in
production): reported, no target.

    .venv/bin/python benchmarks/chaos.py [--edges 2] [--clients 4] [--recover-s 120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.chaos_load import (
    MODEL,
    Ledger,
    Load,
    account,
    acked_updates,
    http_json,
    ledger_records,
)
from benchmarks.chaos_stack import UpStack
from fedcore.keys import read_secret
from fedcore.models import get_spec
from fedcore.process import free_port

FAULTS = ("tritonserver", "edge runtime", "trainer", "nats-server", "gateway")
FAIL_TARGET = 0.01
TARGETED = {"tritonserver", "edge runtime", "trainer", "nats-server"}


def chaos_overrides(round_deadline_s: float = 30.0) -> dict[str, dict[str, str]]:
    """Settings that keep a round in flight most of the time on 2 cores."""
    rollout = {"canary": 30.0, "window_s": 2.0, "min_requests": 10, "staging_timeout_s": 90.0}
    return {
        "FEDGATE_TRAINER_": {
            "MIN_UPDATES": "1",
            "ROUND_DEADLINE_S": str(round_deadline_s),
            "ROUND_INTERVAL_S": "0",
            "BOOTSTRAP_EPOCHS": "2",
            "ROLLOUT_OPTIONS": json.dumps(rollout),
        },
        "FEDGATE_EDGE_": {
            "CAPTURE_RATE": "1.0",
            "MIN_NEW_LABELS": "16",
            "IDLE_QUIET_S": "0",
            "IDLE_MAX_REQUEST_RATE": "100000",
            "IDLE_MAX_PENDING": "100000",
            "IDLE_MAX_QUEUE_US": "1e12",
            "TRAIN_SCHED_IDLE": "false",
            "HEARTBEAT_INTERVAL_S": "0.5",
            "EXIT_TIMEOUT_S": "3",
        },
    }


def chaos_sets(round_deadline_s: float = 30.0) -> list[str]:
    """:func:`chaos_overrides` as ``fedgate up --set service.key=value`` options."""
    services = {"FEDGATE_TRAINER_": "trainer", "FEDGATE_EDGE_": "edge"}
    return [
        f"{services[prefix]}.{key.lower()}={value}"
        for prefix, values in chaos_overrides(round_deadline_s).items()
        for key, value in values.items()
    ]


@dataclass
class Row:
    """One fault's figures."""

    fault: str
    requests: int
    failed: int
    recovery_s: float | None  # None: not back within the limit
    serving_s: float | None = None  # every edge ready and serving again (rounds aside)
    killed: str = ""
    detail: str = ""  # what was still missing when the limit passed

    @property
    def failed_share(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def missed(self, recover_s: float) -> list[str]:
        out = []
        if self.recovery_s is None:
            out.append(f"{self.fault}: not back within {recover_s:.0f}s ({self.detail})")
        if self.fault in TARGETED and self.failed_share > FAIL_TARGET:
            out.append(f"{self.fault}: {self.failed_share:.2%} of requests failed (target 1%)")
        return out


def triton_pids(data_dir: Path, edge_id: str) -> list[int]:
    """The tritonservers serving ``edge_id``'s model repository (not their stubs)."""
    repo = str(data_dir / "edges" / edge_id / "model_repository")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if repo in cmd and "tritonserver " in cmd and "python_backend_stub" not in cmd:
                found.append(int(entry))
    return found


class Chaos:
    """A running stack, its load, and the faults."""

    def __init__(self, stack: UpStack, load: Load, recover_s: float) -> None:
        self.stack = stack
        self.load = load
        self.recover_s = recover_s
        self.key = stack.api_key()

    def _get(self, path: str) -> object:
        return http_json(self.stack.gateway_url + path, self.key)

    def rounds(self) -> dict[str, object]:
        doc = self._get(f"/v1/models/{MODEL}/rounds?limit=1000")
        return doc if isinstance(doc, dict) else {}

    def _missing(self, kill_wall: float, kill_mono: float) -> str:
        """What is not back yet ('' when everything is)."""
        fleet = self._get("/v1/edges")
        if not isinstance(fleet, dict):
            return "gateway not answering"
        ready = {
            e["edge_id"] for e in fleet["edges"] if any(m["ready"] for m in e["models"].values())
        }
        missing = sorted(set(self.stack.edge_ids) - ready)
        if missing:
            return f"not ready: {missing}"
        silent = sorted(set(self.stack.edge_ids) - self.load.served_since(kill_mono))
        if silent:
            return f"not serving: {silent}"
        everyone = set(self.stack.edge_ids)
        done = [
            r
            for r in self.rounds().get("rounds", [])  # type: ignore[attr-defined]
            if r["opened_ts"] > kill_wall
            and r["outcome"] in ("released", "held")
            and everyone <= {c["edge_id"] for c in r["contributors"]}
        ]
        return "" if done else "rounds: none opened since the kill closed with every edge"

    async def fault(self, name: str, kill: Callable[[], Awaitable[str]]) -> Row:
        """Wait until everything is up, kill, wait until everything is back."""
        unsettled = await self._settle()
        killed, detail = await kill(), ""  # the trainer's kill waits for a round's update
        kill_wall, kill_mono = time.time(), time.monotonic()
        killed += f" (before the kill: {unsettled})" if unsettled else ""
        deadline = kill_mono + self.recover_s
        recovery: float | None = None
        serving: float | None = None
        while time.monotonic() < deadline:
            missing = await asyncio.to_thread(self._missing, kill_wall, kill_mono)
            if missing and not missing.startswith("rounds"):
                serving = None  # (again) not serving: an old heartbeat had looked fine
            elif serving is None:
                serving = time.monotonic() - kill_mono
            if not missing:
                recovery = time.monotonic() - kill_mono
                break
            if missing != detail:
                t = time.monotonic() - kill_mono
                print(f"  {name} +{t:.1f}s: {missing}", file=sys.stderr, flush=True)
            detail = missing
            await asyncio.sleep(0.5)
        end = kill_mono + (recovery if recovery is not None else self.recover_s)
        shots = self.load.window(kill_mono, end)
        failed = sum(1 for s in shots if s.status != 200)
        lacking = detail if recovery is None else ""
        return Row(name, len(shots), failed, recovery, serving, killed, lacking)

    async def _settle(self) -> str:
        """Wait until everything is up and a round closed since the last fault was back;
        what was still missing when ``recover_s`` ran out ('' when nothing)."""
        now_wall, now_mono = time.time(), time.monotonic()
        deadline, missing = now_mono + self.recover_s, ""
        while time.monotonic() < deadline:
            missing = await asyncio.to_thread(self._missing, now_wall - 5, now_mono - 5)
            if not missing:
                return ""
            await asyncio.sleep(0.5)
        return missing

    # -- the kills ----------------------------------------------------------------------
    async def kill_triton(self, edge_id: str = "edge-1") -> str:
        pids = triton_pids(self.stack.data_dir, edge_id)
        for pid in pids:
            os.killpg(pid, signal.SIGKILL)  # Triton and its stub share its group
        return f"{edge_id} tritonserver {pids}"

    async def kill_process(self, name: str) -> str:
        pid = self.stack.pid(name)
        os.kill(pid, signal.SIGKILL)
        return f"{name} pid {pid}"

    async def kill_trainer_mid_round(self) -> str:
        """SIGKILL the trainer while the open round holds an accepted update (or after a
        round's worth of waiting, while a round is open)."""
        password = read_secret(self.stack.data_dir / "secrets" / "nats-trainer.pass")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            open_round = self.rounds().get("open")
            if isinstance(open_round, dict) and open_round.get("state") == "open":
                n = int(open_round["round"])
                ledger = await ledger_records(self.stack.nats_url, password)
                if any(r == n for r, _ in ledger):
                    return (await self.kill_process("trainer")) + f", round {n} had an update"
            await asyncio.sleep(0.1)
        return (await self.kill_process("trainer")) + ", no update seen in a round"

    async def accounting(self, wait_s: float = 60.0) -> Ledger:
        """After the load: wait for the open rounds to close, then account."""
        logs = self.stack.data_dir / "logs"
        password = read_secret(self.stack.data_dir / "secrets" / "nats-trainer.pass")
        deadline = time.monotonic() + wait_s
        while True:
            acked = acked_updates(logs)
            rounds = self.rounds().get("rounds", [])
            closed = {r["round"] for r in rounds}  # type: ignore[attr-defined]
            if all(a.round in closed for a in acked) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        ledger = await ledger_records(self.stack.nats_url, password)
        return account(acked, rounds, ledger)  # type: ignore[arg-type]


def plan(chaos: Chaos, faults: list[str]) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
    kills: dict[str, Callable[[], Awaitable[str]]] = {
        "tritonserver": chaos.kill_triton,
        "edge runtime": lambda: chaos.kill_process("edge-2"),
        "trainer": chaos.kill_trainer_mid_round,
        "nats-server": lambda: chaos.kill_process("nats-server"),
        "gateway": lambda: chaos.kill_process("gateway"),
    }
    return [(f, kills[f]) for f in faults]


async def run_faults(
    stack: UpStack, faults: list[str], clients: int, recover_s: float
) -> tuple[list[Row], Ledger, Load]:
    """The load through every fault in turn, then the accounting."""
    _, _, x, y = get_spec(MODEL).dataset()
    load = Load(stack.gateway_url, stack.api_key(), x, y, clients=clients)
    async with load:
        chaos = Chaos(stack, load, recover_s)
        rows = []
        for name, kill in plan(chaos, faults):
            rows.append(await chaos.fault(name, kill))
            print(table(rows[-1:], None), file=sys.stderr, flush=True)
    ledger = await chaos.accounting()
    return rows, ledger, load


def table(rows: list[Row], ledger: Ledger | None) -> str:
    head = f"{'fault':<14} {'requests':>8} {'failed':>7} {'failed %':>9}"
    lines = [f"{head} {'serving back':>13} {'all back':>9}  killed"]
    for r in rows:
        back = f"{r.recovery_s:.1f} s" if r.recovery_s is not None else "NOT BACK"
        serving = f"{r.serving_s:.1f} s" if r.serving_s is not None else "NOT BACK"
        lines.append(
            f"{r.fault:<14} {r.requests:>8} {r.failed:>7} {r.failed_share:>9.2%}"
            f" {serving:>13} {back:>9}  {r.killed}"
        )
    if ledger is None:
        return "\n".join(lines)
    lines.append(
        f"updates acknowledged {ledger.acked}: counted once {ledger.counted}, late "
        f"{ledger.late}, round still open {ledger.pending}, lost {len(ledger.lost)}, "
        f"counted twice {len(ledger.double)}"
    )
    lines += [f"  LOST {x}" for x in ledger.lost] + [f"  TWICE {x}" for x in ledger.double]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--recover-s", type=float, default=120.0)
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, in order")
    ap.add_argument("--data-dir", type=Path, default=None, help="default: a temporary one")
    args = ap.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if args.edges < 2 or any(f not in FAULTS for f in faults):
        ap.error(f"--edges >= 2; --faults among {', '.join(FAULTS)}")
    with tempfile.TemporaryDirectory(prefix="fedgate-chaos-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        stack = UpStack.start(data_dir, args.edges, free_port(), chaos_sets())
        try:
            rows, ledger, load = asyncio.run(
                run_faults(stack, faults, args.clients, args.recover_s)
            )
            restarts = stack.restarts()
        finally:
            status = stack.stop()
    print(table(rows, ledger))
    print(f"requests in all: {len(load.shots)}; restarts: {restarts}; fedgate up exit {status}")
    missed = [m for r in rows for m in r.missed(args.recover_s)]
    missed += ["an acknowledged update was lost or counted twice"] if not ledger.ok else []
    for m in missed:
        print(f"MISSED: {m}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
