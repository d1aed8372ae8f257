"""An edge's id on machines whose names are not valid ids (issue #17, finding 4).

Kubernetes passes the node name; a fully qualified one (``ip-10-0-1-2.ec2.internal``) used
to be taken as the edge id and the edge exited 2 at every start. Now the id is derived
from the node name, a file overrides it, and the NATS user follows the id.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_runtime.settings import EdgeSettings
from fedcore.edge_id import edge_id_from_node_name, is_edge_id


def required(tmp_path: Path) -> dict[str, object]:
    files = {
        "seed_artifacts_dir": tmp_path,
        "trainer_public_key_file": tmp_path / "t.pub",
        "identity_key_file": tmp_path / "id.key",
        "trainer_hpke_public_key_file": tmp_path / "hpke.pub",
        "triton_control_secret_file": tmp_path / "control",
        "nats_password_file": tmp_path / "nats.pass",
    }
    return {"data_dir": tmp_path, **files}


@pytest.mark.parametrize(
    ("node", "edge_id"),
    [
        ("ip-10-0-1-2.ec2.internal", "ip-10-0-1-2-ec2-internal"),
        ("gke-pool-1-abc", "gke-pool-1-abc"),
        ("Store_0042.Example.COM.", "store-0042-example-com"),
        ("-a..b-", "a-b"),
    ],
)
def test_node_names_become_valid_ids(node: str, edge_id: str) -> None:
    assert edge_id_from_node_name(node) == edge_id


def test_long_names_stay_distinct_and_valid() -> None:
    a = edge_id_from_node_name("n" * 70 + ".a.example.com")
    b = edge_id_from_node_name("n" * 70 + ".b.example.com")
    assert a != b and len(a) <= 63 and is_edge_id(a) and is_edge_id(b)
    assert a == edge_id_from_node_name("n" * 70 + ".a.example.com")
    with pytest.raises(ValueError, match="no letter or digit"):
        edge_id_from_node_name("...")


def test_a_fqdn_node_name_gives_the_edge_its_id_and_nats_user(tmp_path: Path) -> None:
    s = EdgeSettings(node_name="ip-10-0-1-2.ec2.internal", **required(tmp_path))  # type: ignore[arg-type]
    assert (s.edge_id, s.nats_user) == ("ip-10-0-1-2-ec2-internal", "ip-10-0-1-2-ec2-internal")


def test_the_id_file_overrides_the_node_name_and_edge_id_overrides_both(tmp_path: Path) -> None:
    id_file = tmp_path / "edge-id"
    base = required(tmp_path) | {"node_name": "n1.example.com", "edge_id_file": id_file}
    assert EdgeSettings(**base).edge_id == "n1-example-com"  # type: ignore[arg-type]
    id_file.write_text("store-0042\n")
    s = EdgeSettings(**base)  # type: ignore[arg-type]
    assert (s.edge_id, s.nats_user) == ("store-0042", "store-0042")
    s = EdgeSettings(**base, edge_id="edge-7", nats_user="other")  # type: ignore[arg-type]
    assert (s.edge_id, s.nats_user) == ("edge-7", "other")
    id_file.write_text("Not.Valid")
    with pytest.raises(ValidationError, match="must match"):
        EdgeSettings(**base)  # type: ignore[arg-type]


def test_no_id_at_all_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no edge id: set edge_id, edge_id_file"):
        EdgeSettings(**required(tmp_path))  # type: ignore[arg-type]


def test_the_node_name_is_read_from_the_environment(tmp_path: Path) -> None:
    """The settings as the DaemonSet passes them (environment variables, no id file on the
    node), read in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    env |= {f"FEDGATE_EDGE_{k.upper()}": str(v) for k, v in required(tmp_path).items()}
    env |= {
        "FEDGATE_EDGE_NODE_NAME": "ip-10-0-1-2.ec2.internal",
        "FEDGATE_EDGE_EDGE_ID_FILE": str(tmp_path / "edge-id"),
        "FEDGATE_EDGE_LOG_JSON": "false",
    }
    code = "from edge_runtime.settings import EdgeSettings as S; s = S(); print(s.edge_id)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ip-10-0-1-2-ec2-internal"
