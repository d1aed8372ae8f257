"""The trainer service. At this stage: hold the global versions and stay on the bus.

Rounds, aggregation and releases plug in here (see the trainer issue); the service
already connects to NATS with its own credentials and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import nats
from nats.aio.client import Client as NATS

from fedcore.keys import load_ed25519, load_x25519
from fedcore.models import get_spec
from fedcore.transport import StreamSpec
from trainer.bootstrap import ensure_version_one
from trainer.bus import ensure_transport
from trainer.ledger import UpdateLedger
from trainer.registry import RegistryFile, mirror_registry
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


def bootstrap(settings: TrainerSettings) -> None:
    """Make sure version 1 of every configured model exists and is signed."""
    key = load_ed25519(settings.signing_key_file)
    for name in settings.models:
        ensure_version_one(
            get_spec(name),
            settings.artifacts_dir,
            settings.state_dir,
            key,
            fraction=settings.bootstrap_seed_fraction,
            epochs=settings.bootstrap_epochs,
            seed=settings.seed,
        )


async def prepare_transport(nc: NATS, settings: TrainerSettings, registry: RegistryFile) -> None:
    """Create the updates stream, object bucket and ledger; mirror the edge registry."""
    js = nc.jetstream()
    spec = StreamSpec(
        duplicate_window_s=settings.updates_duplicate_window_s,
        max_age_s=settings.updates_max_age_s,
        max_msg_size=nc.max_payload,
        replicas=settings.nats_replicas,
    )
    await ensure_transport(js, spec)
    await UpdateLedger.open(js, replicas=settings.nats_replicas)
    await mirror_registry(js, registry.current(), replicas=settings.nats_replicas)


async def serve(settings: TrainerSettings) -> None:
    """Bootstrap, connect to NATS and run until SIGTERM or SIGINT."""
    await asyncio.to_thread(bootstrap, settings)
    load_x25519(settings.hpke_private_key_file)  # fail at start on a missing or loose key
    registry = RegistryFile(settings.edge_registry_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(
        servers=settings.nats_url.split(","),
        user=settings.nats_user,
        password=settings.nats_password(),
        name="trainer",
        max_reconnect_attempts=-1,
    )
    try:
        await prepare_transport(nc, settings, registry)
        log.info("trainer ready", extra={"models": ",".join(settings.models)})
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5)
