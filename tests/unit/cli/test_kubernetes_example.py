"""docs/kubernetes/relay.yaml, the Kubernetes example of the docs, checked against the commands
it runs and the health server its probes ask: an option renamed or a probe path changed fails
here instead of in a user's cluster."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from outbox.cli.commands import app
from outbox.cli.health import HealthServer

MANIFEST = Path(__file__).resolve().parents[3] / "docs" / "kubernetes" / "relay.yaml"


def _documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def _command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _container(kind: str) -> dict[str, Any]:
    [container] = _documents()[kind]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_i8_the_relay_deployment_uses_only_options_and_variables_the_relay_reads() -> None:
    relay = _container("Deployment")
    assert relay["command"] == ["outbox", "relay"]
    params = _command("relay").params
    options = {opt for p in params for opt in p.opts}
    envvars = {p.envvar for p in params if getattr(p, "envvar", None)}
    for arg in relay["args"]:
        if arg.startswith("-"):
            assert arg in options, f"outbox relay has no option {arg}"
    secret = _documents()["Secret"]["stringData"]
    assert set(secret) <= envvars, set(secret) - envvars
    assert {"OUTBOX_DB", "OUTBOX_BOOTSTRAP_SERVERS"} <= set(secret)  # the required ones
    for env in relay["env"]:
        assert env["name"] in envvars, env["name"]
    assert _container("Job")["command"] == ["outbox", "migrate"]


def test_the_probes_ask_the_paths_the_health_server_answers_on_the_metrics_port() -> None:
    relay = _container("Deployment")
    [port] = relay["ports"]
    args = relay["args"]
    assert args[args.index("--metrics-port") + 1] == str(port["containerPort"])
    probes = {relay[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")}
    assert {relay[k]["httpGet"]["port"] for k in ("livenessProbe", "readinessProbe")} == {
        port["name"]
    }
    server = HealthServer(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        live=lambda: (True, "alive"),
        ready=lambda: (False, "no slots yet"),
    ).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        live = urllib.request.urlopen(f"{base}{relay['livenessProbe']['httpGet']['path']}")
        assert live.status == 200
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}{relay['readinessProbe']['httpGet']['path']}")
        assert refused.value.code == 503
    finally:
        server.stop()
    assert probes == {"/healthz", "/readyz"}
