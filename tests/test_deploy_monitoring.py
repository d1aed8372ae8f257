"""Prometheus and Grafana in compose/: the dashboard queries metrics that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.deploy_support import COMPOSE_DIR, load_yaml

DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "fedgate.json"

# Triton's metrics port (REFERENCE.md, "Triton model repository and control").
TRITON = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_pending_request_count",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
}
# prometheus-nats-exporter with -varz -jsz=all.
NATS_EXPORTER = {
    "gnatsd_varz_connections",
    "gnatsd_varz_in_msgs",
    "gnatsd_varz_out_msgs",
    "gnatsd_varz_in_bytes",
    "gnatsd_varz_out_bytes",
    "jetstream_stream_total_messages",
    "jetstream_stream_total_bytes",
    "jetstream_consumer_num_pending",
}
PROMQL_WORDS = {
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "clamp_min",
    "by",
    "without",
    "on",
    "ignoring",
}


def family_names(registry: Any) -> set[str]:
    """Every sample name a registry exposes (families with their suffixes)."""
    names = set()
    for family in registry.collect():
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_sum", "_count", "_created"):
            names.add(family.name + suffix)
    return names


def gateway_registry() -> Any:
    """A built gateway app's registry (the rollout metrics register when the app is built)."""
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    with tempfile.TemporaryDirectory() as tmp:
        settings = GatewaySettings(
            nats_user="gateway", nats_password_file=Path(tmp) / "p", dev_mode=True
        )
        return create_app(settings, bus=False).state.metrics.registry


def service_registries() -> list[Any]:
    """The trainer's and the edge runtime's registries, every series present."""
    import numpy as np

    from edge_runtime.events import EventLog
    from edge_runtime.supervisor import SupervisionStats, SupervisorCollector
    from edge_runtime.telemetry import EdgeMetrics
    from fedcore.enrollment import EdgeRegistry
    from fedcore.settings import ServiceSettings
    from trainer.ingest_metrics import IngestMetrics
    from trainer.roster import Roster
    from trainer.rounds import RoundBook, RoundPolicy
    from trainer.secagg_metrics import SecAggMetrics
    from trainer.strategies import get_strategy
    from trainer.telemetry import start_metrics

    params = np.zeros(1, np.float32)
    book = RoundBook(
        "m", RoundPolicy(), get_strategy("fedavg"), version=1, digest="ab" * 32, params=params
    )
    book.open(["edge-1"])
    settings = ServiceSettings(nats_user="x", nats_password_file=COMPOSE_DIR / "none")
    trainer = start_metrics(settings, {"m": book}).registry
    IngestMetrics(trainer)
    Roster(SimpleNamespace(current=EdgeRegistry), 5.0, trainer)  # its heartbeat refusals
    SecAggMetrics(trainer, ["m"])  # secure rounds' failures and culprits
    # the spool families are there without spools
    edge = EdgeMetrics({}, EventLog(), [SupervisorCollector(SupervisionStats())])
    edge.on_event(EventLog().emit("update-published", "m", num_samples=1, loss=1.0, accuracy=1.0))
    return [trainer, edge.registry]


def gateway_metrics() -> set[str]:
    """Every sample name the gateway exposes."""
    return family_names(gateway_registry())


def service_metrics() -> set[str]:
    """Every sample name the trainer and the edge runtime expose."""
    return {n for r in service_registries() for n in family_names(r)}


def exported_names() -> set[str]:
    """The name each family of ours is known by (counters with ``_total``)."""
    out = set()
    for registry in [gateway_registry(), *service_registries()]:
        for family in registry.collect():
            out.add(family.name + "_total" if family.type == "counter" else family.name)
    return out


def metric_names(expr: str) -> set[str]:
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(by|without)\s*\([^)]*\)", " ", expr)
    tokens = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare))
    return {t for t in tokens if t not in PROMQL_WORDS}


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def unknown_metrics(dashboard: dict[str, Any]) -> set[str]:
    known = gateway_metrics() | service_metrics() | TRITON | NATS_EXPORTER
    return {m for q in queries(dashboard) for m in metric_names(q)} - known


def test_the_dashboard_queries_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and len(dashboard["panels"]) >= 10
    assert unknown_metrics(dashboard) == set()
    used = {m for q in queries(dashboard) for m in metric_names(q)}
    for prefix in ("fedgate_gateway_", "fedgate_gateway_rollout_", "fedgate_trainer_"):
        assert any(m.startswith(prefix) for m in used), prefix
    assert any(m.startswith("fedgate_edge_") for m in used)
    assert any(m.startswith("nv_gpu_") for m in used)


def test_the_metric_check_catches_a_typo() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = "rate(fedgate_gateway_request_total[1m])"
    assert unknown_metrics(dashboard) == {"fedgate_gateway_request_total"}


def test_prometheus_and_grafana_are_wired() -> None:
    compose = load_yaml(COMPOSE_DIR / "compose.yaml")
    prometheus = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert {"gateway", "triton", "nats", "trainer", "edge"} <= set(jobs)
    env = {name: service.get("environment", {}) for name, service in compose["services"].items()}
    trainer_port = env["trainer"]["FEDGATE_TRAINER_METRICS_PORT"]
    assert jobs["trainer"]["static_configs"][0]["targets"] == [f"trainer:{trainer_port}"]
    scraped = {sc["labels"]["edge"]: sc["targets"][0] for sc in jobs["edge"]["static_configs"]}
    for edge, target in scraped.items():
        e = env[edge]
        assert target == f"{e['FEDGATE_EDGE_METRICS_HOST']}:{e['FEDGATE_EDGE_METRICS_PORT']}"
    key_file = jobs["gateway"]["authorization"]["credentials_file"]
    targets = [s["target"] for s in compose["services"]["prometheus"]["secrets"]]
    assert key_file == f"/run/secrets/{targets[0]}"
    for sc in jobs["triton"]["static_configs"]:
        assert "edge" in sc["labels"], "the dashboard groups Triton metrics by edge"
    provider = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "fedgate.yaml")
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
    datasource = load_yaml(COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml")
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}


# -- alert rules and units (issue #17, finding 3) ----------------------------------------
PROMETHEUS_DIR = COMPOSE_DIR / "prometheus"
PROMTOOL = Path(sys.executable).parent / "promtool"


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_alert_rules_pass_promtool_and_their_tests() -> None:
    check = promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"][0]["rules"]
    tests = load_yaml(PROMETHEUS_DIR / "alerts.test.yml")["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == {r["alert"] for r in rules}, "every alert has a test in which it fires"
    known = gateway_metrics() | service_metrics() | TRITON | NATS_EXPORTER | {"up"}
    assert {m for r in rules for m in metric_names(r["expr"])} - known == set()


def test_a_broken_rule_test_fails_promtool(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text((PROMETHEUS_DIR / "alerts.yml").read_text())
    text = (PROMETHEUS_DIR / "alerts.test.yml").read_text()
    (tmp_path / "alerts.test.yml").write_text(text.replace("model: digits}", "model: other}", 1))
    assert promtool("test", "rules", "alerts.test.yml", cwd=tmp_path).returncode != 0


def test_the_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    compose = load_yaml(COMPOSE_DIR / "compose.yaml")
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    key = tmp_path / "key"
    key.write_text("k")
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(key)
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


PER_SECOND = {"ops", "reqps", "rps", "wps", "Bps", "bps"}


def unit_problems(dashboard: dict[str, Any]) -> list[str]:
    """Per-second units only on rates; shares and accuracies as percentages."""
    problems = []
    for panel in dashboard["panels"]:
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if unit in PER_SECOND and not all(re.search(r"\b(i?rate)\(", e) for e in exprs):
            problems.append(f"{panel['title']}: {unit} on a query that is not a rate")
        if any(re.search(r"accuracy\b", e) for e in exprs) and unit != "percentunit":
            problems.append(f"{panel['title']}: accuracy shown as {unit}")
    return problems


def test_panel_units_fit_their_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert unit_problems(dashboard) == []
    for panel in dashboard["panels"]:
        if "epsilon" in panel["title"]:
            assert panel["fieldConfig"]["defaults"]["unit"] == "none"
        if "rounds closed" in panel["title"]:
            assert panel["fieldConfig"]["defaults"]["unit"] == "short"
    for panel in dashboard["panels"]:
        if "accuracy" in panel["title"]:
            panel["fieldConfig"]["defaults"]["unit"] = "ops"
    assert len(unit_problems(dashboard)) == 4  # each panel: not a rate, not a percentage
