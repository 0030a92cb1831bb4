"""deploy/: what can be checked without a container engine or a cluster, checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    monkeypatch.setenv("DISTILLERY_KEYS", "app-key-1")  # from compose's .env, or k8s's Secret
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


# -- docker compose -------------------------------------------------------------------

COMPOSE = DEPLOY / "docker" / "compose.yaml"


def compose_command() -> list[str]:
    """``docker compose`` (v2) where the plugin is installed, else ``docker-compose``."""
    docker = shutil.which("docker")
    if docker and run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is None:
        pytest.skip("no docker compose: apt-get install docker-compose")
    return [legacy]


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return run(
        *compose_command(),
        "--project-directory",
        str(COMPOSE.parent),
        "--env-file",
        str(env_file),
        "-f",
        str(COMPOSE),
        "config",
    )


def _published(ports: list[Any]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port), from compose's short or long syntax."""
    found = []
    for port in ports:
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["published"]), str(port["target"])))
        else:
            host, published, target = str(port).rsplit(":", 2)
            found.append((host, published, target.split("/")[0]))
    return found


def test_compose_validates_publishes_the_proxy_and_shares_one_data_volume(
    tmp_path: Path,
) -> None:
    """The stack as the README starts it (example.env filled in): valid for compose, the
    proxy reachable from the host's loopback, keys from the environment, and the proxy
    and the curate job on one data volume (the dashboard serves what curate writes)."""
    env_file = tmp_path / ".env"
    env_file.write_text((DEPLOY / "docker" / "example.env").read_text())
    result = compose_config(env_file)
    assert result.returncode == 0, result.stderr
    stack = yaml.safe_load(result.stdout)
    proxy, curate = stack["services"]["proxy"], stack["services"]["curate"]
    assert _published(proxy["ports"]) == [("127.0.0.1", "8787", "8787")]
    assert proxy["environment"]["DISTILLERY_KEYS"] == "app-key-support,app-key-sales"
    assert proxy["environment"]["DISTILLERY_ADMIN_KEYS"] == "admin-key-change-me"

    def mounts(service: dict[str, Any]) -> dict[str, str]:
        return {
            (v["target"] if isinstance(v, dict) else v.split(":")[1]): (
                v["source"] if isinstance(v, dict) else v.split(":")[0]
            )
            for v in service["volumes"]
        }

    data = "/var/lib/distillery"
    assert mounts(proxy)[data] == mounts(curate)[data] == "data"
    assert "data" in stack["volumes"]
    # Each key left out is named, not a stack that starts and answers 401.
    for variable in ("DISTILLERY_KEYS", "DISTILLERY_ADMIN_KEYS", "OPENAI_API_KEY"):
        lines = [line for line in env_file.read_text().splitlines() if variable + "=" not in line]
        partial = tmp_path / f"without-{variable}.env"
        partial.write_text("\n".join(lines) + "\n")
        refused = compose_config(partial)
        assert refused.returncode != 0 and variable in refused.stderr, refused.stderr


def test_keys_from_the_environment_or_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What compose passes: the mounted config plus DISTILLERY_KEYS / _ADMIN_KEYS (or
    *_FILE, a secret) lets the apps' keys call and the admin key see everything."""
    from distillery.core.config import key_fingerprint, load_settings
    from distillery.core.errors import ConfigError

    config = DEPLOY / "docker" / "distillery.toml"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    monkeypatch.setenv("DISTILLERY_KEYS", "app-key-support, app-key-sales")
    monkeypatch.setenv("DISTILLERY_ADMIN_KEYS", key_fingerprint("admin-key"))
    settings = load_settings(config)
    assert settings.auth.accepts("app-key-sales") and not settings.auth.accepts("other")
    assert settings.auth.is_admin("admin-key")
    secret = tmp_path / "app_keys"
    secret.write_text("from-a-secret\nand-another\n")
    monkeypatch.setenv("DISTILLERY_KEYS_FILE", str(secret))
    assert load_settings(config).auth.accepts("and-another")
    monkeypatch.setenv("DISTILLERY_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="Cannot read DISTILLERY_KEYS_FILE"):
        load_settings(config)
    monkeypatch.delenv("DISTILLERY_KEYS_FILE")
    monkeypatch.delenv("DISTILLERY_KEYS")
    monkeypatch.delenv("DISTILLERY_ADMIN_KEYS")
    with pytest.raises(ConfigError, match="DISTILLERY_KEYS"):
        load_settings(config)  # the upstream key held, no key to call with: refused
