"""The hybrid ML-KEM-768+X25519 HPKE key end to end: its files, ``fedgate keys init
--kem``, the edge sealing with the suite the trainer's public file names, and the real
trainer process (``HPKE_KEM``) opening those updates over a real nats-server while it
refuses an X25519-sealed one and a key file of the other KEM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import x25519

from edge_runtime.publisher import UpdatePublisher, load_edge_keys
from edge_runtime.sealer import Keys, UpdateFor, UpdateSealer
from fedcore.compression import CompressionSettings
from fedcore.envelope import SUITE_MLKEM768_X25519, SUITE_X25519, open_update, suite_of
from fedcore.errors import KeyFileError
from fedcore.keys import (
    generate_hpke_key,
    load_hpke_key,
    parse_hpke_public,
    public_hex,
    read_hpke_public,
)
from fedgate.cli import main
from fedgate.keys_cmd import KeyLayout, init_keys
from tests.conftest import NatsServer
from tests.trainer_process import (
    DIM,
    SIZES,
    released_weights,
    send,
    trainer_and_edge,
    wait_open,
    wait_record,
)
from tests.transport_harness import trainer_env

HYBRID = "mlkem768-x25519"


def test_hybrid_key_files_round_trip_and_open_what_the_edge_seals(tmp_path: Path) -> None:
    layout = init_keys(tmp_path / "keys", ["edge-1"], kem=HYBRID)
    assert os.stat(layout.hpke_key).st_mode & 0o777 == 0o600
    assert layout.hpke_key.read_text().count("BEGIN PRIVATE KEY") == 2  # ML-KEM, X25519
    kem, value = layout.hpke_pub.read_text().split()
    assert kem == HYBRID and len(bytes.fromhex(value)) == 1184 + 32
    loaded = load_hpke_key(layout.hpke_key, HYBRID)
    assert isinstance(loaded.private, hpke.MLKEM768X25519PrivateKey)
    assert loaded.public_text == layout.hpke_pub.read_text().strip()  # same key back
    signer, recipient = load_edge_keys(layout.edge_key("edge-1"), layout.hpke_pub)
    assert suite_of(recipient) == SUITE_MLKEM768_X25519
    sealer = UpdateSealer(
        edge_id="edge-1", sizes=[4], compression=CompressionSettings(), keys=Keys(signer, recipient)
    )
    target = UpdateFor("digits", 1, 1, "ab" * 32)
    sealed = sealer.seal(np.arange(4, dtype=np.float32), target, num_samples=3)
    assert sealed.header.suite == SUITE_MLKEM768_X25519
    header, payload = open_update(
        sealed.envelope,
        recipient=loaded.private,
        edge_keys={"edge-1": signer.public_key()}.get,
        max_payload=1 << 20,
    )
    assert bytes(payload) == np.arange(4, dtype="<f4").tobytes() and header.num_samples == 3


def test_x25519_files_keep_their_format(tmp_path: Path) -> None:
    made = generate_hpke_key(tmp_path / "x.key")
    assert made.kem == "x25519" and made.public_text == public_hex(made.private)  # bare hex
    assert isinstance(parse_hpke_public(made.public_text), x25519.X25519PublicKey)
    assert isinstance(parse_hpke_public(f"x25519 {made.public_text}"), x25519.X25519PublicKey)
    assert load_hpke_key(tmp_path / "x.key").kem == "x25519"


def test_a_key_of_the_other_kem_or_a_bad_public_file_is_refused(tmp_path: Path) -> None:
    generate_hpke_key(tmp_path / "x.key")
    generate_hpke_key(tmp_path / "h.key", HYBRID)
    with pytest.raises(KeyFileError, match="KEM x25519; the settings select mlkem768-x25519"):
        load_hpke_key(tmp_path / "x.key", HYBRID)
    with pytest.raises(KeyFileError, match="KEM mlkem768-x25519; the settings select x25519"):
        load_hpke_key(tmp_path / "h.key", "x25519")
    os.chmod(tmp_path / "h.key", 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_hpke_key(tmp_path / "h.key")
    (tmp_path / "junk.key").write_text("hello")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(KeyFileError, match="not an HPKE key"):
        load_hpke_key(tmp_path / "junk.key")
    for text, message in (
        (f"{HYBRID} " + "00" * 1215, "1215 bytes, expected 1184 \\+ 32"),
        ("kyber512 " + "00" * 32, "unknown HPKE KEM 'kyber512'"),
        ("x25519 00 11", "'<hex>' or '<kem> <hex>'"),
        ("zz" * 32, "not a hex-encoded x25519 public key"),
    ):
        with pytest.raises(KeyFileError, match=message):
            parse_hpke_public(text)
    with pytest.raises(KeyFileError, match="does not exist"):
        read_hpke_public(tmp_path / "missing.pub")


def test_cli_keys_init_with_the_hybrid_kem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "k"
    assert main(["keys", "init", "--dir", str(d), "--kem", HYBRID, "--edges", "1"]) == 0
    out = capsys.readouterr().out
    assert f"trainer-hpke.pub), {HYBRID}" in out and "PRIVATE KEY" not in out
    layout = KeyLayout(d)
    public = layout.hpke_pub.read_text()
    assert public.startswith(f"{HYBRID} ")
    assert suite_of(read_hpke_public(layout.hpke_pub)) == SUITE_MLKEM768_X25519
    private = layout.hpke_key.read_bytes()
    assert main(["keys", "init", "--dir", str(d), "--edges", "2"]) == 0  # kept, not replaced
    assert main(["keys", "init", "--dir", str(d), "--kem", HYBRID]) == 0
    assert main(["keys", "init", "--dir", str(d), "--kem", "x25519"]) == 1  # never overwritten
    assert "is an HPKE key of KEM mlkem768-x25519, not x25519" in capsys.readouterr().err
    assert layout.hpke_key.read_bytes() == private and layout.hpke_pub.read_text() == public
    assert main(["keys", "init", "--dir", str(tmp_path / "x")]) == 0  # default: X25519
    assert suite_of(read_hpke_public(KeyLayout(tmp_path / "x").hpke_pub)) == SUITE_X25519


def test_trainer_refuses_a_key_file_of_another_kem(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", [])  # X25519
    env = trainer_env(tmp_path, keys, "nats://127.0.0.1:1", tmp_path / "p", HPKE_KEM=HYBRID)
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "serve"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert b"KEM x25519; the settings select mlkem768-x25519" in done.stdout + done.stderr
    assert not (tmp_path / "trainer" / "artifacts").exists()  # refused before bootstrapping


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_hybrid_sealed_updates_through_nats_to_the_trainer_process(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    edges = ["edge-1", "edge-2", "edge-3"]
    keys = init_keys(tmp_path / "keys", edges, kem=HYBRID)
    rng = np.random.default_rng(3)
    deltas = rng.normal(0.0, 1e-3, (2, DIM)).astype(np.float32)
    samples = [30, 10]
    settings = {"HPKE_KEM": HYBRID, "MIN_UPDATES": "2"}
    async with trainer_and_edge(tmp_path, keys, nats_server, **settings) as (trainer, nc):
        js = nc.jetstream()
        a1 = await wait_open(js, 1, trainer)
        # edge-3 seals with X25519 (a downgrade): refused, never folded
        other = x25519.X25519PrivateKey.generate().public_key()
        await send(nc, keys, "edge-3", a1, np.ones(DIM, np.float32), 99, other)
        target = UpdateFor("digits", a1.round, a1.base_version, a1.base_digest)
        for edge, delta, n in zip(edges, deltas, samples, strict=False):
            signer, recipient = load_edge_keys(keys.edge_key(edge), keys.hpke_pub)
            sealer = UpdateSealer(
                edge_id=edge,
                sizes=SIZES,
                compression=CompressionSettings(),
                keys=Keys(signer, recipient),
            )
            sealed = sealer.seal(delta, target, num_samples=n)
            assert sealed.header.suite == SUITE_MLKEM768_X25519
            await UpdatePublisher.for_connection(nc).publish(sealed.envelope)
        record = await wait_record(js, 1, trainer)
        assert record.outcome == "released" and record.released_version == 2
        assert sorted(c.edge_id for c in record.contributors) == ["edge-1", "edge-2"]
    v1, v2 = released_weights(tmp_path, 1), released_weights(tmp_path, 2)
    want = v1 + (samples[0] * deltas[0] + samples[1] * deltas[1]) / sum(samples)
    np.testing.assert_allclose(v2, want, rtol=0, atol=1e-7)
    assert "unsupported-suite" in (tmp_path / "trainer.log").read_text()
