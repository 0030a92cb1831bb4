"""deploy/: what can be checked without a container engine or a cluster, checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distillery.cli import cli

DEPLOY = Path(__file__).parent.parent / "deploy"
BIN = Path(sys.executable).parent
YAMLLINT = "{extends: default, rules: {line-length: {max: 100}}}"


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), str(DEPLOY / "docker" / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_match_their_schemas() -> None:
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    result = run(tool("kubernetes-validate"), "--strict", *manifests)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(manifests)


def test_yaml_is_clean() -> None:
    result = run(tool("yamllint"), "--strict", "-d", YAMLLINT, str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not on this machine")
    distillery = tool("distillery")
    for unit in (DEPLOY / "systemd").iterdir():
        # verify checks that ExecStart exists: point it at this install.
        (tmp_path / unit.name).write_text(
            unit.read_text().replace("/usr/local/bin/distillery", distillery)
        )
    result = run(analyze, "verify", *sorted(str(p) for p in tmp_path.iterdir()))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def _configs(tmp_path: Path) -> list[Path]:
    configmap = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    from_k8s = tmp_path / "k8s.toml"
    from_k8s.write_text(configmap["data"]["distillery.toml"])
    return [from_k8s, DEPLOY / "docker" / "distillery.toml"]


def test_the_config_the_manifests_mount_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-secret")
    for config in _configs(tmp_path):
        result = CliRunner().invoke(cli, ["proxy", "-c", str(config), "--check-config"])
        assert "Configuration OK: listening on 0.0.0.0:8787" in result.output, result.output
        # Only the probes of hosts that exist where it is deployed may fail here.
        failing = [line for line in result.output.splitlines() if "FAIL" in line]
        assert all(
            line.strip().startswith(("FAIL  database:", "FAIL  upstream:")) for line in failing
        ), result.output


def test_manifests_agree_on_ports_probes_and_workers() -> None:
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 8787
    assert pod["spec"]["terminationGracePeriodSeconds"] > 60  # above shutdown_timeout
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "--workers" in container["args"]
