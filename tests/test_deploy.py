"""The deployment files in deploy/, checked offline: no Docker engine, no cluster.

yamllint runs over every YAML file and kubernetes-validate over every Kubernetes manifest
(strict, against 1.30 and the newest schemas it knows). Both are optional: without them those
tests skip, unless ATTENDANCE_TEST_REQUIRE_SERVICES=1. The rest reads the files and checks
what running the hub depends on: probes, the drain and the grace periods, non-root pods,
the autoscaler, settings that exist, placeholders that cannot pass for secrets, and the
compose file's services. The image itself is never built here (docs/operations.md,
"Deploying").
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import yaml

from hub.cli import DRAIN_TIMEOUT_S
from hub.config import ConfigError, Settings
from hub.tokens import TokenIssuer
from tests.conftest import missing_service
from workers.fraud import Thresholds

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SECRET_TEMPLATE = K8S / "secret.template.yaml"
PLACEHOLDER = "CHANGE-ME"
# The oldest Kubernetes the manifests must be valid for.
OLDEST_KUBERNETES = "1.30"
# After the drain and uvicorn's shutdown the hub still stops its tasks and closes its pools,
# which no timeout bounds: a grace period leaves at least this much for them.
SHUTDOWN_SLACK_S = 5.0

Manifest = dict[str, Any]


def _optional(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        missing_service(f"{module} is not installed (pip install kubernetes-validate yamllint)")


# --- reading the files ---------------------------------------------------------------


def _deploy_files() -> list[Path]:
    """The text files under deploy/, less those deploy/.gitignore keeps out of git (a
    filled-in .env or secret.yaml on this machine is not what is being checked)."""
    ignored = {
        line.strip()
        for line in (DEPLOY / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    return sorted(
        path
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.relative_to(DEPLOY).as_posix() not in ignored and _text(path)
    )


def _text(path: Path) -> bool:
    try:
        path.read_text()
    except UnicodeDecodeError:
        return False
    return True


def _yaml_files() -> list[Path]:
    return [
        path
        for path in _deploy_files()
        if path.suffix in (".yaml", ".yml") or path.name == ".yamllint"
    ]


@cache
def _manifests() -> tuple[tuple[Path, Manifest], ...]:
    """Every Kubernetes object under deploy/k8s, with its file; the secret template too."""
    found = []
    for path in _yaml_files():
        if path.parent != K8S or path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                found.append((path, document))
    return tuple(found)


def _objects(kind: str) -> list[Manifest]:
    return [manifest for _, manifest in _manifests() if manifest["kind"] == kind]


def _one(kind: str, name: str | None = None) -> Manifest:
    matches = [m for m in _objects(kind) if name is None or m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def _deployment(command: str) -> Manifest:
    """The Deployment whose container runs `attendance-hub <command> ...`."""
    matches = [
        d for d in _objects("Deployment") if _container(d["spec"]["template"])["args"][0] == command
    ]
    assert len(matches) == 1, f"expected one Deployment running `{command}`"
    return matches[0]


def _container(template: Manifest) -> Manifest:
    containers = template["spec"]["containers"]
    assert len(containers) == 1, "one container per pod"
    return containers[0]


def _pod_templates() -> list[tuple[str, Manifest]]:
    return [
        (f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"])
        for m in _objects("Deployment") + _objects("Job")
    ]


def _config_env() -> dict[str, str]:
    return dict(_one("ConfigMap", "attendance-hub")["data"])


@cache
def _compose() -> Manifest:
    compose: Manifest = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return compose


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def _seconds(duration: str | int) -> float:
    """A compose or HAProxy duration (`40s`, `1m30s`, `1h`, `500ms`) in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _matches(selector: Manifest, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics: matchLabels and matchExpressions."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _container_port(template: Manifest, port: str | int) -> int:
    """A port as a probe, Service or NetworkPolicy names it, resolved to the container's."""
    ports = _container(template)["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports], f"no container port {port}"
        return port
    by_name = {p["name"]: p["containerPort"] for p in ports}
    assert port in by_name, f"no container port named {port!r}"
    return int(by_name[port])


# --- what the hub's code says ----------------------------------------------------------


def _setting_names() -> set[str]:
    """Every ATTENDANCE_* variable hub/config.py reads."""
    source = (ROOT / "hub" / "config.py").read_text()
    names = set(re.findall(r"\"(ATTENDANCE_[A-Z0-9_]+)\"", source))
    # The fraud thresholds are read by field name: ATTENDANCE_FRAUD_<FIELD>.
    assert 'f"ATTENDANCE_FRAUD_{field.name.upper()}"' in source, "fraud names changed"
    names |= {f"ATTENDANCE_FRAUD_{f.name.upper()}" for f in msgspec.structs.fields(Thresholds)}
    return names


def _shutdown_budget_s(env: dict[str, str]) -> float:
    """The longest a hub takes from SIGTERM to exit, bar closing its pools: the drain
    (the window plus DRAIN_TIMEOUT_S, hub/cli.py) and then uvicorn's graceful shutdown."""
    source = (ROOT / "hub" / "cli.py").read_text()
    graceful = re.search(r"timeout_graceful_shutdown=([^,\n]+)", source)
    assert graceful is not None, "serve() no longer sets timeout_graceful_shutdown"
    if graceful.group(1) == "int(DRAIN_TIMEOUT_S)":
        graceful_s = float(int(DRAIN_TIMEOUT_S))
    else:
        graceful_s = float(graceful.group(1))
    settings = Settings.from_env(env)
    return settings.drain_window_s + DRAIN_TIMEOUT_S + graceful_s


def _command_timeout_s() -> float:
    """How long one statement, e.g. a batch's commit, may take (hub/store.py's pools)."""
    timeouts = re.findall(r"command_timeout=(\d+)", (ROOT / "hub" / "store.py").read_text())
    assert timeouts, "hub/store.py no longer sets command_timeout"
    return float(max(int(t) for t in timeouts))


# --- linters ---------------------------------------------------------------------------


def test_yamllint_passes_on_every_yaml_file() -> None:
    _optional("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    files = _yaml_files()
    assert DEPLOY / "compose.yaml" in files and K8S / "kustomization.yaml" in files
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: {problem.message}"
        for path in files
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "newest"])
def test_manifests_are_valid_kubernetes(version: str) -> None:
    kubernetes_validate = _optional("kubernetes_validate")
    if version == "newest":
        version = kubernetes_validate.latest_version()
    errors = []
    for path, manifest in _manifests():
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_service_monitor_scrapes_the_hub_service checks its shape
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.name} {manifest['kind']}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{path.name}: {exc.message}")
    assert not errors, "\n".join(errors)


# --- Kubernetes ------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in _yaml_files() if p.parent == K8S} - {
        "kustomization.yaml",
        SECRET_TEMPLATE.name,
    }
    # Applying the template would overwrite the real Secret with placeholders.
    assert SECRET_TEMPLATE.name not in kustomization["resources"]
    assert sorted(kustomization["resources"]) == sorted(files)
    assert kustomization["namespace"] == _one("Namespace")["metadata"]["name"]
    assert _one("Secret")["metadata"]["namespace"] == kustomization["namespace"]
    images = {image["name"] for image in kustomization["images"]}
    for where, template in _pod_templates():
        assert _container(template)["image"].split(":")[0] in images, where


def test_hub_probes_hit_readyz_and_healthz_on_the_container_port() -> None:
    template = _deployment("serve")["spec"]["template"]
    hub = _container(template)
    assert hub["args"] == ["serve", "--no-workers"]
    port = int(_config_env()["ATTENDANCE_PORT"])
    for probe, path in (
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ):
        assert hub[probe]["httpGet"]["path"] == path, probe
        assert _container_port(template, hub[probe]["httpGet"]["port"]) == port, probe
    service = _one("Service", "attendance-hub")
    assert _matches({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
    worker = _deployment("worker")["spec"]["template"]["metadata"]["labels"]
    assert not _matches({"matchLabels": service["spec"]["selector"]}, worker)
    for service_port in service["spec"]["ports"]:
        assert _container_port(template, service_port["targetPort"]) == port


def test_hub_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    spec = _deployment("serve")["spec"]["template"]["spec"]
    pre_stop = _container({"spec": spec})["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        sleep_s = float(command[1])
    assert sleep_s >= 5, "the ingress controller needs a few seconds to drop the endpoint"
    env = {**_config_env(), "ATTENDANCE_DATABASE_URL": "postgresql://db/x"}
    budget_s = sleep_s + _shutdown_budget_s(env) + SHUTDOWN_SLACK_S
    assert spec["terminationGracePeriodSeconds"] >= budget_s, (
        f"preStop {sleep_s:g} s + drain and shutdown {budget_s - sleep_s:g} s"
    )


def test_worker_grace_period_covers_a_batch_in_hand() -> None:
    spec = _deployment("worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > _command_timeout_s()


def test_every_pod_runs_as_non_root_with_a_read_only_root() -> None:
    dockerfile_user = _final_stage_user()
    templates = _pod_templates()
    assert {where.split("/")[0] for where, _ in templates} == {"Deployment", "Job"}
    for where, template in templates:
        pod = template["spec"]
        container = _container(template)
        pod_context, context = pod["securityContext"], container["securityContext"]
        assert pod_context["runAsNonRoot"] is True, where
        uid = context.get("runAsUser", pod_context.get("runAsUser"))
        assert uid is not None and uid != 0, where
        assert uid == dockerfile_user, f"{where}: runAsUser {uid}, image USER {dockerfile_user}"
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert context["capabilities"].get("add") is None, where
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) >= {"cpu", "memory"}, f"{where} {kind}"
        # A read-only root needs somewhere to write temporary files (and the embedded
        # PostgreSQL's socket, were it ever used).
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert "/tmp" in mounts, where


def test_hpa_scales_the_hub_deployment_on_cpu_and_memory() -> None:
    hpa = _one("HorizontalPodAutoscaler")
    hub = _deployment("serve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": hub["apiVersion"],
        "kind": "Deployment",
        "name": hub["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    resources = sorted(
        (metric["resource"]["name"], metric["resource"]["target"]["type"])
        for metric in hpa["spec"]["metrics"]
        if metric["type"] == "Resource"
    )
    assert resources == [("cpu", "Utilization"), ("memory", "Utilization")]
    # Utilization is a share of the requests: without them the HPA cannot work.
    requests = _container(hub["spec"]["template"])["resources"]["requests"]
    assert set(requests) >= {"cpu", "memory"}
    # With a replica count here every `kubectl apply` would undo the autoscaler.
    assert "replicas" not in hub["spec"]


def test_disruption_budgets_select_hubs_and_workers() -> None:
    selected = set()
    for budget in _objects("PodDisruptionBudget"):
        for command in ("serve", "worker"):
            labels = _deployment(command)["spec"]["template"]["metadata"]["labels"]
            if _matches(budget["spec"]["selector"], labels):
                selected.add(command)
                assert budget["spec"].get("maxUnavailable") == 1
    assert selected == {"serve", "worker"}


def test_service_monitors_scrape_the_hubs_and_the_workers() -> None:
    services = _objects("Service")
    config = _config_env()
    # Where each kind of pod serves /metrics.
    metrics_ports = {
        "serve": int(config["ATTENDANCE_PORT"]),
        "worker": int(config["ATTENDANCE_WORKER_METRICS_PORT"]),
    }
    scraped = set()
    for monitor in _objects("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        [service] = [s for s in services if _matches(spec["selector"], s["metadata"]["labels"])]
        [command] = [
            command
            for command in metrics_ports
            if _matches(
                {"matchLabels": service["spec"]["selector"]},
                _deployment(command)["spec"]["template"]["metadata"]["labels"],
            )
        ]
        scraped.add(command)
        template = _deployment(command)["spec"]["template"]
        target_ports = {port["name"]: port["targetPort"] for port in service["spec"]["ports"]}
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert endpoint.get("path", "/metrics") == "/metrics"
            assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
            target = target_ports[endpoint["port"]]
            assert _container_port(template, target) == metrics_ports[command], endpoint
    assert scraped == {"serve", "worker"}
    # deploy/prometheus/alerts.yaml selects the hubs by job, the hub Service's name.
    assert "attendance-hub" in {s["metadata"]["name"] for s in services}


def _routed(ingresses: list[Manifest], path: str) -> bool:
    """Whether any of these Ingresses sends the path anywhere (Exact and Prefix rules)."""
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for route in rule["http"]["paths"]:
                if route["pathType"] == "Exact" and path == route["path"]:
                    return True
                prefix = route["path"].rstrip("/")
                if route["pathType"] == "Prefix" and (
                    prefix == "" or path == prefix or path.startswith(prefix + "/")
                ):
                    return True
    return False


def test_ingress_keeps_websockets_open_and_health_inside() -> None:
    ingresses = _objects("Ingress")
    service = _one("Service", "attendance-hub")
    port_names = {port["name"] for port in service["spec"]["ports"]}
    websocket = [i for i in ingresses if _routed([i], "/v1/ws")]
    assert len(websocket) == 1
    annotations = websocket[0]["metadata"]["annotations"]
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert annotations[f"nginx.ingress.kubernetes.io/{timeout}"] == "3600", timeout
    for ingress in ingresses:
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for rule in ingress["spec"]["rules"]:
            for route in rule["http"]["paths"]:
                backend = route["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in port_names
    for path in (
        "/v1/ws",
        "/v1/punches",
        "/",
        "/kiosk",
        "/kiosk-worker.js",
        "/js/index.js",
        "/static/pages.css",
        "/iclock/cdata",
        "/iclock/getrequest.aspx",
    ):
        assert _routed(ingresses, path), path
    for path in ("/metrics", "/healthz", "/readyz"):
        assert not _routed(ingresses, path), f"{path} needs no token: keep it in the cluster"


def test_network_policies_admit_only_the_ingress_and_prometheus() -> None:
    policies = _objects("NetworkPolicy")
    ingress_nginx, prometheus = ("ingress-nginx", "ingress-nginx"), ("monitoring", "prometheus")
    dns = {("UDP", 53), ("TCP", 53)}
    postgres, redis = ("TCP", 5432), ("TCP", 6379)
    # command -> (who may connect, on which port, what it may reach)
    expected = {
        "serve": ({ingress_nginx, prometheus}, "ATTENDANCE_PORT", {postgres, redis, *dns}),
        "worker": ({prometheus}, "ATTENDANCE_WORKER_METRICS_PORT", {postgres, redis, *dns}),
        "migrate": (set(), None, {postgres, *dns}),
    }
    for where, template in _pod_templates():
        labels = template["metadata"]["labels"]
        covering = [p for p in policies if _matches(p["spec"]["podSelector"], labels)]
        assert len(covering) == 1, f"{where}: one NetworkPolicy, found {len(covering)}"
        policy = covering[0]["spec"]
        sources, port_setting, destinations = expected[_container(template)["args"][0]]
        assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"], where
        egress = {
            (port["protocol"], port["port"]) for rule in policy["egress"] for port in rule["ports"]
        }
        assert egress == destinations, where
        if port_setting is None:
            assert policy["ingress"] == [], f"{where} serves nothing"
            continue
        [rule] = policy["ingress"]
        peers = {
            (
                peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            )
            for peer in rule["from"]
        }
        assert peers == sources, where
        port = int(_config_env()[port_setting])
        assert [_container_port(template, p["port"]) for p in rule["ports"]] == [port], where


def test_pods_take_settings_from_the_configmap_and_the_secret() -> None:
    configmap = _one("ConfigMap")["metadata"]["name"]
    secret = _one("Secret")["metadata"]["name"]
    for where, template in _pod_templates():
        container = _container(template)
        sources = [
            (kind, source[kind]["name"])
            for source in container["envFrom"]
            for kind in ("configMapRef", "secretRef")
            if kind in source
        ]
        assert sources == [("configMapRef", configmap), ("secretRef", secret)], where
        # Secrets come only from the Secret, never inline.
        assert "env" not in container, where
    config = _config_env()
    for name in ("ATTENDANCE_DATABASE_URL", "ATTENDANCE_REDIS_URL", "ATTENDANCE_SECRET"):
        assert name not in config, f"{name} belongs in the Secret"
    settings = Settings.from_env(
        {
            **config,
            "ATTENDANCE_DATABASE_URL": "postgresql://db/attendance",
            "ATTENDANCE_REDIS_URL": "redis://redis:6379/0",
        }
    )
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    # The hubs are told to trust X-Forwarded-For (uvicorn's own variable, not ours).
    assert config["FORWARDED_ALLOW_IPS"] == "*"


def test_secret_template_holds_only_placeholders() -> None:
    secret = _one("Secret")
    assert "data" not in secret, "base64 `data` hides what is in it; use stringData"
    values = secret["stringData"]
    assert set(values) >= {"ATTENDANCE_DATABASE_URL", "ATTENDANCE_REDIS_URL", "ATTENDANCE_SECRET"}
    for name, value in values.items():
        assert value == "" or value == PLACEHOLDER, f"{name}: {value!r} is not a placeholder"
    # A hub started with the placeholders refuses to run.
    with pytest.raises(ValueError):
        TokenIssuer(values["ATTENDANCE_SECRET"])
    with pytest.raises(ConfigError):
        Settings.from_env(values)
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "k8s/secret.yaml" in ignored and ".env" in ignored


def test_no_file_in_deploy_holds_a_real_looking_secret() -> None:
    token = re.compile(r"[A-Za-z0-9_+/=-]{32,}")
    credentials = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
    for path in _deploy_files():
        text = path.read_text()
        for found in token.findall(text):
            mixed = all(re.search(c, found) for c in ("[a-z]", "[A-Z]", "[0-9]"))
            assert not mixed, f"{path.relative_to(ROOT)}: {found[:8]}... looks like a secret"
        for password in credentials.findall(text):
            assert password in (PLACEHOLDER, "PASSWORD"), f"{path.relative_to(ROOT)}: a password"


def test_every_attendance_variable_named_exists_in_hub_config() -> None:
    known = _setting_names()
    assert "ATTENDANCE_DRAIN_WINDOW_S" in known and "ATTENDANCE_FRAUD_BUDDY_GAP_S" in known
    named: dict[str, set[str]] = {}
    for path in _deploy_files():
        for name in re.findall(r"ATTENDANCE_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            named.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "ATTENDANCE_SECRET" in named
    unknown = {name: sorted(files) for name, files in named.items() if name not in known}
    assert not unknown, f"not read by hub/config.py: {unknown}"


# --- the image -------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """deploy/Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _final_stage_user() -> int:
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "the image runs as root: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {uid}: a numeric UID lets Kubernetes check runAsNonRoot"
    return int(uid)


def _exec_form(instruction: str) -> list[str]:
    rest = next(rest for keyword, rest in _final_stage() if keyword == instruction)
    words = json.loads(rest)
    assert isinstance(words, list), f"{instruction} in exec form (a JSON array)"
    return [str(word) for word in words]


def test_dockerfile_builds_a_non_root_image_of_the_hub() -> None:
    instructions = _dockerfile()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build, then a runtime without the build's leftovers"
    base = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    for image in froms:
        image = image.split()[0]
        image = base.get(image.strip("${}"), image)
        assert image.startswith("python:3.11-slim"), image
    final = _final_stage()
    keywords = [keyword for keyword, _ in final]
    user = keywords.index("USER")
    assert user < keywords.index("ENTRYPOINT") and user < keywords.index("CMD")
    assert _final_stage_user() != 0
    entrypoint = _exec_form("ENTRYPOINT")
    assert entrypoint[-1] == "attendance-hub", entrypoint
    assert entrypoint[:-1] in ([], ["/usr/bin/tini", "--"]), entrypoint
    assert _exec_form("CMD") == ["serve"]
    assert [rest for keyword, rest in final if keyword == "EXPOSE"] == ["8080"]
    env = {}
    for keyword, rest in final:
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))
    assert env["ATTENDANCE_HOST"] == "0.0.0.0"
    assert env.get("ATTENDANCE_PORT", "8080") == "8080"
    healthcheck = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "/healthz" in healthcheck[0]
    # The package only, no dev dependencies; and nothing secret baked in.
    installs = [
        rest for keyword, rest in instructions if keyword == "RUN" and "pip install" in rest
    ]
    assert len(installs) == 1 and re.search(r"pip install \.(\s|$)", installs[0]), installs
    for keyword, rest in instructions:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|_URL", rest), f"{keyword} {rest}"


def test_dockerfile_puts_the_js_client_where_hub_web_lib_points() -> None:
    link = ROOT / "hub" / "web" / "lib"
    assert link.is_symlink(), "hub/web/lib is no longer a link: revisit deploy/Dockerfile"
    target = posixpath.normpath(posixpath.join("hub/web", os.readlink(link)))
    copies = {}
    for keyword, rest in _dockerfile():
        if keyword == "COPY" and not rest.startswith("--"):
            *sources, destination = rest.split()
            for source in sources:
                copies[source.rstrip("/")] = posixpath.normpath(
                    posixpath.join(destination, posixpath.basename(source.rstrip("/")))
                    if destination.endswith("/") and len(sources) > 1
                    else destination
                )
    # Both land relative to the build stage's WORKDIR, so the link resolves there.
    assert copies.get("hub") == "hub", copies
    assert copies.get(target) == target, f"COPY {target}/ {target}/ is missing"
    # The context's ignore file lets through everything the COPYs read.
    patterns = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in copies:
        assert f"!{source}" in patterns, f"{source} is ignored by Dockerfile.dockerignore"


@pytest.fixture
def healthz_server() -> Iterator[tuple[int, list[int]]]:
    """An HTTP server answering /healthz with the status at the end of the list."""
    statuses = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(statuses[-1] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dockerfile_healthcheck_command_fails_unless_healthz_answers_200(
    healthz_server: tuple[int, list[int]],
) -> None:
    rest = next(rest for keyword, rest in _final_stage() if keyword == "HEALTHCHECK")
    command = json.loads(rest[rest.index("CMD ") + 4 :])
    assert command[0] == "python"

    def check() -> int:
        env = {**os.environ, "ATTENDANCE_PORT": str(port)}
        return subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30
        ).returncode

    port, statuses = healthz_server
    assert check() == 0
    statuses.append(503)
    assert check() != 0
    port = 1  # nothing listens there
    assert check() != 0


# --- compose ---------------------------------------------------------------------------


def test_compose_runs_two_hubs_a_worker_and_a_migration() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "hub-1", "hub-2", "worker", "lb"}
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert services["redis"]["image"].split(":")[1].startswith("7")
    hubs = ("hub-1", "hub-2")
    app = ("migrate", *hubs, "worker")
    for name in app:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        assert service["env_file"] == ".env", name
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["command"][0] == "worker"
    for name in (*hubs, "worker"):
        after = services[name]["depends_on"]["migrate"]["condition"]
        assert after == "service_completed_successfully", name
    for name in ("migrate", "worker"):
        assert services[name]["healthcheck"] == {"disable": True}, f"{name} serves no HTTP"
    budget_s = _shutdown_budget_s({"ATTENDANCE_DATABASE_URL": "postgresql://db/x"})
    for name in hubs:
        hub = services[name]
        assert hub["command"] == ["serve", "--no-workers"], name
        assert "ports" not in hub, f"{name} is reached through the load balancer only"
        assert _seconds(hub["stop_grace_period"]) >= budget_s + SHUTDOWN_SLACK_S, name
        # Secrets come from the env file only.
        assert not any(key.startswith("ATTENDANCE_") for key in hub.get("environment", {}))
    assert _seconds(services["worker"]["stop_grace_period"]) > _command_timeout_s()
    assert services["lb"]["ports"] == ["8080:8080"]


def test_compose_env_example_names_the_services() -> None:
    example = _env_file(DEPLOY / ".env.example")
    assert set(example) == {
        "POSTGRES_PASSWORD",
        "ATTENDANCE_DATABASE_URL",
        "ATTENDANCE_REDIS_URL",
        "ATTENDANCE_SECRET",
    }
    postgres = _compose()["services"]["postgres"]["environment"]
    user, database = postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert example["ATTENDANCE_DATABASE_URL"] == (
        f"postgresql://{user}:{example['POSTGRES_PASSWORD']}@postgres:5432/{database}"
    )
    assert example["ATTENDANCE_REDIS_URL"].startswith("redis://redis:6379/")
    # Until the placeholder is replaced, the hubs refuse to start.
    assert example["ATTENDANCE_SECRET"] == PLACEHOLDER
    with pytest.raises(ValueError):
        TokenIssuer(example["ATTENDANCE_SECRET"])


def _haproxy() -> dict[str, list[str]]:
    """deploy/haproxy.cfg as section header -> its lines."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def test_haproxy_checks_readyz_on_every_hub_and_keeps_websockets_open() -> None:
    config = _haproxy()
    backend = config["backend hubs"]
    hubs = {name for name in _compose()["services"] if name.startswith("hub-")}
    servers = {line.split()[1]: line.split()[2] for line in backend if line.startswith("server ")}
    assert servers == {name: f"{name}:8080" for name in hubs}
    assert "http-check send meth GET uri /readyz" in backend
    assert "http-check expect status 200" in backend
    assert any(line.startswith("default-server check") for line in backend)
    timeouts = {
        line.split()[1]: _seconds(line.split()[2])
        for line in config["defaults"]
        if line.startswith("timeout ")
    }
    assert timeouts["tunnel"] >= 3600
    frontend = config["frontend http"]
    # The hubs trust X-Forwarded-For from any peer: it must be HAProxy's, not the client's.
    assert "http-request set-header X-Forwarded-For %[src]" in frontend
    assert "option forwardfor" not in " ".join(config["defaults"] + frontend)
    hidden = next(line for line in frontend if line.startswith("http-request deny"))
    assert {"/metrics", "/healthz", "/readyz"} <= set(hidden.split())
