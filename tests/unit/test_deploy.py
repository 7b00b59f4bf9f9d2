"""deploy/ stays in step with the code: commands, metric names, settings keys, ports and exit codes.

No YAML library is a dependency, so YAML files get structural checks and the values that
matter are read with targeted patterns; the JSON dashboard and the TOML settings files are
parsed for real.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import consumers.archiver  # noqa: F401 - registers the archiver's metrics
from cli.main import COMMANDS
from pipeline.settings import Settings, load_settings, to_dict
from trainers.schedule import EXIT_REFUSED, EXIT_USAGE, CronError, schedule_from

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "plantwatch-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
MONITORING = [DASHBOARD, DEPLOY / "prometheus" / "prometheus.yml", ALERTS]
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "info": ("_info",), "summary": ("", "_count", "_sum", "_created")}
ENV_NAME = re.compile(r"\bPLANTWATCH_([A-Z0-9_]+?)__([A-Z0-9_]+)\b")


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def exposed_metric_names() -> set[str]:
    """Every sample name the daemons can expose, e.g. ``plantwatch_records_total``, ``plantwatch_model_info``."""
    return {family.name + suffix for family in REGISTRY.collect() if family.name.startswith("plantwatch_")
            for suffix in SUFFIXES[family.type]}


def mentioned_subcommands() -> set[str]:
    """Subcommands in `plantwatch …` quotes, ExecStart lines, exec-form arrays and compose commands
    (the image's entrypoint is plantwatch); prose that merely names the product is not a command."""
    found: set[str] = set()
    for path in deploy_files(".yaml", ".yml", ".service", ".timer", ".toml", ".example", "Dockerfile"):
        body = text(path)
        found |= set(re.findall(r"(?:`|bin/)plantwatch[ \t]+([a-z][a-z-]*)", body))
        found |= set(re.findall(r'"plantwatch",\s*"([a-z][a-z-]*)"', body))
        if path.name == "compose.yaml":
            found |= set(re.findall(r'^\s*command:\s*\["([a-z][a-z-]*)"', body, flags=re.M))
    return found


def capture(pattern: str, body: str) -> str:
    """The first group of the first match, which must exist."""
    match = re.search(pattern, body, flags=re.M)
    assert match, f"no match for {pattern!r}"
    return match.group(1)


def yaml_documents(path: Path) -> list[str]:
    return [doc for doc in re.split(r"^---\s*$", text(path), flags=re.M) if re.search(r"^\w", doc, flags=re.M)]


def top_level_keys(document: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z]\w*):", document, flags=re.M))


def embedded_toml(path: Path, key: str) -> str:
    """The block scalar ``key: |`` of a ConfigMap, dedented."""
    block = capture(rf"^\s+{re.escape(key)}: \|\n((?:    .*\n|\s*\n)+)", text(path))
    return textwrap.dedent(block)


def settings_from_toml(body: str, tmp_path: Path) -> Settings:
    path = tmp_path / "plantwatch.toml"
    path.write_text(body, encoding="utf-8")
    return load_settings(path, env={})


def compose_environment() -> dict[str, str]:
    """The PLANTWATCH_* variables the compose services share (the x-plantwatch anchor)."""
    pairs = re.findall(r"^\s+(PLANTWATCH_\w+):\s*(.+?)\s*$", text(DEPLOY / "compose.yaml"), flags=re.M)
    return {name: value.strip('"') for name, value in pairs}


def test_json_files_parse_and_every_dashboard_panel_queries_prometheus() -> None:
    for path in deploy_files(".json"):
        json.loads(text(path))
    dashboard = json.loads(text(DASHBOARD))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert len(panels) >= 10
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables


def test_yaml_files_are_block_yaml_and_kubernetes_documents_are_objects() -> None:
    yaml_paths = deploy_files(".yaml", ".yml")
    assert len(yaml_paths) >= 12
    for path in yaml_paths:
        body = text(path)
        assert "\t" not in body, f"tab in {path.name}"
        indents = {len(line) - len(line.lstrip(" ")) for line in body.splitlines() if line.strip()}
        assert all(i % 2 == 0 for i in indents), f"odd indentation in {path.name}"
    kinds = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_documents(path):
            keys = top_level_keys(doc)
            assert {"apiVersion", "kind"} <= keys, path.name
            kind = capture(r"^kind:\s*(\w+)", doc)
            kinds.append(kind)
            if kind != "Kustomization":
                assert "metadata" in keys and re.search(r"^  name: plantwatch", doc, flags=re.M), path.name
    assert sorted(kinds) == sorted(["Kustomization", "Namespace", "ConfigMap", "Secret", "PersistentVolumeClaim",
                                    "Deployment", "PodDisruptionBudget", "Service", "Deployment", "Service",
                                    "CronJob", "ServiceMonitor"] + ["NetworkPolicy"] * 4)


def test_kustomization_applies_every_manifest_but_the_examples() -> None:
    listed = re.findall(r"^  - (\S+\.yaml)$", text(K8S / "kustomization.yaml"), flags=re.M)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk - {"secret.example.yaml", "servicemonitor.yaml"}


def test_every_plantwatch_subcommand_in_deploy_exists() -> None:
    found = mentioned_subcommands()
    assert {"detect", "archive", "train", "schedule"} <= found
    assert found <= set(COMMANDS), sorted(found - set(COMMANDS))


def test_every_metric_in_dashboards_and_alerts_is_exposed() -> None:
    exposed = exposed_metric_names()
    assert {"plantwatch_records_total", "plantwatch_score_seconds_bucket", "plantwatch_model_info"} <= exposed
    named = {path.name: set(re.findall(r"\bplantwatch_[a-z0-9_]+", text(path))) for path in MONITORING}
    assert len(named[DASHBOARD.name]) >= 10 and len(named[ALERTS.name]) >= 6
    for name, metrics in named.items():
        assert metrics <= exposed, f"{name}: unknown metrics {sorted(metrics - exposed)}"


def test_quantiles_are_taken_from_histogram_buckets_by_le() -> None:
    calls = [call for path in (DASHBOARD, ALERTS)
             for call in re.findall(r"histogram_quantile\((.+?)\)\)\)", text(path).replace("\n", " "))]
    assert len(calls) >= 7  # three quantiles of two histograms on the dashboard, one alert
    for call in calls:
        assert re.search(r"plantwatch_\w+_bucket\{", call) and "by (le)" in call, call


def test_alert_rules_select_the_scrape_jobs_prometheus_defines() -> None:
    jobs = set(re.findall(r"job_name:\s*(\S+)", text(DEPLOY / "prometheus" / "prometheus.yml")))
    selected = set(re.findall(r'job="([^"]+)"', text(DEPLOY / "prometheus" / "alerts.yml")))
    assert jobs == selected == {"plantwatch-detector", "plantwatch-archiver"}


def test_every_plantwatch_environment_variable_names_a_setting() -> None:
    known = {f"{section}.{key}" for section, keys in to_dict(load_settings(env={})).items() for key in keys}
    named = {f"{s.lower()}.{k.lower()}" for path in deploy_files("") for s, k in ENV_NAME.findall(text(path))}
    assert "kafka.sasl_password_file" in named and "kafka.bootstrap_servers" in named
    assert "kafka.sasl_password" not in named  # secrets are files, never environment variables
    assert named <= known, sorted(named - known)


def test_compose_settings_load_and_match_the_scrape_ports() -> None:
    settings = load_settings(env=compose_environment())
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.registry.uri.startswith("/var/lib/plantwatch/")
    prometheus = text(DEPLOY / "prometheus" / "prometheus.yml")
    ports = [int(p) for p in re.findall(r"port:\s*(\d+)", prometheus)]
    archiver = capture(r'command: \["archive", "--http-port", "(\d+)"\]', text(DEPLOY / "compose.yaml"))
    assert ports == [settings.detector.http_port, int(archiver)]


def test_kubernetes_settings_load_and_match_the_detector_ports(tmp_path: Path) -> None:
    settings = settings_from_toml(embedded_toml(K8S / "configmap.yaml", "plantwatch.toml"), tmp_path)
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.kafka.sasl_password == ""
    for uri in (settings.registry.uri, settings.archive.uri, settings.trainer.lock_path):
        assert uri.startswith("/var/lib/plantwatch/")  # the PVC's mount path
    detector = text(K8S / "detector.yaml")
    port = settings.detector.http_port
    assert re.findall(r"containerPort: (\d+)", detector) == [str(port)]
    assert f'prometheus.io/port: "{port}"' in detector and f"port: {port}" in detector
    cronjob = text(K8S / "trainer-cronjob.yaml")
    deadline = int(capture(r"activeDeadlineSeconds: (\d+)", cronjob))
    assert deadline < settings.trainer.lock_max_age_s < deadline + 3600


def test_systemd_settings_load(tmp_path: Path) -> None:
    settings = settings_from_toml(text(DEPLOY / "systemd" / "plantwatch.toml"), tmp_path)
    for uri in (settings.registry.uri, settings.archive.uri, settings.trainer.lock_path):
        assert uri.startswith("/var/lib/plantwatch/")  # the units' StateDirectory


def test_a_gate_refusal_or_a_busy_lock_is_not_treated_as_a_failure_to_retry() -> None:
    from cli.train_cmd import EXIT_BUSY

    service = text(DEPLOY / "systemd" / "plantwatch-train.service")
    assert re.search(rf"^SuccessExitStatus={EXIT_REFUSED} {EXIT_BUSY}$", service, flags=re.M)
    cronjob = text(K8S / "trainer-cronjob.yaml")
    assert f"values: [{EXIT_USAGE}, {EXIT_REFUSED}, {EXIT_BUSY}]" in cronjob and "restartPolicy: Never" in cronjob


@pytest.mark.parametrize("source", ["compose", "cronjob"])
def test_training_schedules_are_valid_cron(source: str) -> None:
    body = text(DEPLOY / "compose.yaml") if source == "compose" else text(K8S / "trainer-cronjob.yaml")
    key = "PLANTWATCH_TRAINER__CRON" if source == "compose" else "schedule"
    expression = capture(rf'^\s*{key}:\s*"([^"]+)"', body)
    schedule_from(expression, 86400.0)
    with pytest.raises(CronError):
        schedule_from(expression.replace("17", "61", 1), 86400.0)
