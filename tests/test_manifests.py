"""The Kubernetes manifests and the plain Prometheus scrape config, checked with real tools.

`kubectl kustomize` renders deploy/ and the sharded overlay (no cluster needed),
kubernetes-validate checks each core
object against the Kubernetes OpenAPI schemas in strict mode, the exporter's own loader reads
the generated ConfigMap, and promtool checks the scrape config and the alert rules. The
Prometheus Operator's kinds have no schema there, so their structure is checked by hand. Every
tool is required: a missing one fails the suite rather than skipping it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from exporter.config import ConfigError, parse_config
from exporter.runtime import PROBE_PATHS
from exporter.webconfig import load_web_config
from tests.conftest import require_tool

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "catalog-upload-exporter.rules.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "scrape-config.yml"
DASHBOARD = DEPLOY / "grafana" / "catalog-upload-exporter.json"
SHARDED = DEPLOY / "overlays" / "sharded"
SIDECAR = DEPLOY / "components" / "sidecar"
PODMONITOR = DEPLOY / "components" / "podmonitor"
#: The Catalog API's request budget per account, shared by every replica.
API_REQUESTS_PER_SECOND = 10
#: Native sidecars (restartPolicy: Always on an init container) are on by default from 1.29;
#: 1.31 is the oldest schema checked, the newest kubernetes-validate ships the other.
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.latest_version())
OPERATOR_API = "monitoring.coreos.com/v1"
EXPORTER_IMAGE = "ghcr.io/catalog-upload-exporter/catalog-upload-exporter:"
INGESTIONS_DIR = "/var/run/catalog-ingestions"
TOKEN_DIR = "/var/run/secrets/catalog"

Manifest = dict[str, Any]


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def kustomize(directory: Path) -> list[Manifest]:
    output = run(require_tool("kubectl"), "kustomize", str(directory))
    return [document for document in yaml.safe_load_all(output) if document]


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    """Everything `kubectl apply -k deploy` would send, rendered once for the module."""
    return kustomize(DEPLOY)


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(manifests: list[Manifest], kind: str = "Deployment") -> Manifest:
    spec: Manifest = one(manifests, kind)["spec"]["template"]["spec"]
    return spec


def exporter_container(manifests: list[Manifest], kind: str = "Deployment") -> Manifest:
    spec = pod_spec(manifests, kind)
    found: list[Manifest] = [
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if c["image"].startswith(EXPORTER_IMAGE)
    ]
    assert len(found) == 1, "expected exactly one exporter container"
    return found[0]


def app_container(manifests: list[Manifest]) -> Manifest:
    others: list[Manifest] = [
        c for c in pod_spec(manifests)["containers"] if not c["image"].startswith(EXPORTER_IMAGE)
    ]
    assert len(others) == 1, "expected exactly one application container"
    return others[0]


def exporter_configmap(manifests: list[Manifest]) -> Manifest:
    found = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap"
        and m["metadata"]["name"].startswith("catalog-upload-exporter-config-")
    ]
    assert len(found) == 1
    return found[0]


def metrics_port(manifests: list[Manifest]) -> int:
    return metrics_port_of_kind(manifests, "Deployment")


def metrics_port_of_kind(manifests: list[Manifest], kind: str) -> int:
    ports = [p for p in exporter_container(manifests, kind)["ports"] if p["name"] == "metrics"]
    assert len(ports) == 1
    port: int = ports[0]["containerPort"]
    return port


def test_kustomize_renders_every_object_the_deployment_needs(manifests: list[Manifest]) -> None:
    """`kubectl kustomize deploy` renders the app, exporter, config, dashboard and alerts."""
    assert Counter(m["kind"] for m in manifests) == Counter(
        {
            "Deployment": 1,
            "ConfigMap": 2,
            "Secret": 1,
            "Service": 1,
            "ServiceAccount": 1,
            "ServiceMonitor": 1,
            "PrometheusRule": 1,
        }
    )
    assert all("namespace" not in m["metadata"] for m in manifests), "namespace is the user's"
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "catalog-upload-exporter"


def test_the_kubernetes_directory_renders_on_its_own() -> None:
    """`kubectl apply -k deploy/kubernetes` works too: everything but the dashboard."""
    kinds = Counter(m["kind"] for m in kustomize(DEPLOY / "kubernetes"))
    assert kinds["ConfigMap"] == 1
    assert kinds["Deployment"] == 1


def test_every_core_object_validates_strictly_against_the_kubernetes_schemas(
    manifests: list[Manifest],
) -> None:
    """Each built-in kind is valid for Kubernetes 1.31 and the newest schema, unknown fields
    included (strict mode)."""
    core = [m for m in manifests if m["apiVersion"] != OPERATOR_API]
    assert {m["kind"] for m in core} == {
        "Deployment",
        "ConfigMap",
        "Secret",
        "Service",
        "ServiceAccount",
    }
    problems = schema_problems(core)
    assert not problems, "\n".join(problems)


def schema_problems(core: list[Manifest]) -> list[str]:
    """What kubernetes-validate finds wrong with each object, for every checked version."""
    problems = []
    for version in KUBERNETES_VERSIONS:
        for manifest in core:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = "/".join(map(str, error.path))
                problems.append(f"{manifest['kind']} for {version}: {where}: {error.message}")
    return problems


def test_the_servicemonitor_scrapes_the_services_metrics_port(manifests: list[Manifest]) -> None:
    """The ServiceMonitor selects the Service by its labels and scrapes port "metrics"."""
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")
    assert monitor["apiVersion"] == OPERATOR_API
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= service["metadata"]["labels"].items()
    assert "matchExpressions" not in monitor["spec"]["selector"]
    endpoints = monitor["spec"]["endpoints"]
    assert len(endpoints) == 1
    assert endpoints[0]["port"] == "metrics"
    assert endpoints[0]["path"] == "/metrics"
    assert endpoints[0]["interval"] == "30s"
    assert "metrics" in {port["name"] for port in service["spec"]["ports"]}


def test_the_service_reaches_the_exporters_port_on_the_deployments_pods(
    manifests: list[Manifest],
) -> None:
    """The Service selects the pod template's labels and targets the container's metrics port."""
    service = one(manifests, "Service")
    template = one(manifests, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    ports = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
    assert len(ports) == 1
    assert ports[0]["port"] == metrics_port(manifests)
    assert ports[0]["targetPort"] in {"metrics", metrics_port(manifests)}


def test_the_prometheusrule_carries_exactly_the_rules_file(
    manifests: list[Manifest], tmp_path: Path
) -> None:
    """spec.groups equals the groups of the rules file, which promtool accepts as rules."""
    rule = one(manifests, "PrometheusRule")
    assert rule["apiVersion"] == OPERATOR_API
    assert rule["metadata"]["name"]
    rules_file = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    assert set(rules_file) == {"groups"}
    assert rule["spec"] == {"groups": rules_file["groups"]}, (
        "deploy/kubernetes/prometheusrule.yaml drifted from the rules file: regenerate it with "
        "the command at its top"
    )
    rendered = tmp_path / "rendered.rules.yml"
    rendered.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    run(require_tool("promtool"), "check", "rules", str(rendered))


def test_the_pod_and_every_container_are_locked_down(manifests: list[Manifest]) -> None:
    """Pod and each container (sidecar included): non-root numeric ids, read-only root,
    no privilege escalation, no capabilities, RuntimeDefault seccomp, requests and limits."""
    spec = pod_spec(manifests)
    assert len(spec.get("initContainers", []) + spec["containers"]) == 2
    assert_locked_down(spec)


def assert_locked_down(spec: Manifest) -> None:
    """The pod spec and each of its containers run as the security tests expect."""
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = spec.get("initContainers", []) + spec["containers"]
    assert containers
    for container in containers:
        assert_container_locked_down(container)


def assert_container_locked_down(container: Manifest) -> None:
    """The container's own settings meet the Pod Security Standard "restricted", whatever
    its pod sets, and it has requests, limits and a tagged image."""
    name = container["name"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True, name
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0, name
    assert isinstance(context["runAsGroup"], int) and context["runAsGroup"] > 0, name
    assert context["readOnlyRootFilesystem"] is True, name
    assert context["allowPrivilegeEscalation"] is False, name
    assert context["capabilities"] == {"drop": ["ALL"]}, name
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
    assert not context.get("privileged", False), name
    for bound in ("requests", "limits"):
        assert set(container["resources"][bound]) >= {"cpu", "memory"}, (name, bound)
    assert not container["image"].endswith(":latest"), name
    assert ":" in container["image"], name


def test_the_exporter_is_a_native_sidecar_probed_for_liveness_only(
    manifests: list[Manifest],
) -> None:
    """The exporter is an init container with restartPolicy Always whose only probe is a
    generous liveness probe on /healthz (through its port named metrics): nothing about it
    gates the app's start or readiness, and it keeps serving an invalid config."""
    spec = pod_spec(manifests)
    exporter = exporter_container(manifests)
    assert exporter in spec["initContainers"]
    assert exporter["restartPolicy"] == "Always"
    assert metrics_port(manifests) == 10184
    assert_gates_nothing(exporter)
    assert "--on-invalid-config=serve" in exporter["args"]


def assert_gates_nothing(exporter: Manifest) -> None:
    """No startupProbe, no readinessProbe, and a liveness probe on /healthz that restarts
    only an exporter that failed to answer for a minute or more."""
    assert "startupProbe" not in exporter, "a native sidecar's startupProbe gates the app"
    assert "readinessProbe" not in exporter, "a native sidecar's readiness is the pod's"
    liveness = exporter["livenessProbe"]
    assert liveness["httpGet"] == {"path": "/healthz", "port": "metrics"}
    patience = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert patience >= 60, "only a hung exporter is restarted"
    assert liveness["timeoutSeconds"] >= 5


def test_the_sidecar_requests_the_memory_it_uses_idle_and_limits_what_100k_uploads_need(
    manifests: list[Manifest],
) -> None:
    """The memory request covers the measured idle RSS (61 MiB) with room for a few thousand
    uploads (a scheduler can trust it); the limit holds 100,000 uploads (285 MiB, 340 MiB in a
    relabelling reload; docs/deploying.md, "Resources")."""
    resources = exporter_container(manifests)["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= 128
    assert mebibytes(resources["limits"]["memory"]) >= 384


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity in MiB (only the suffixes our manifests use)."""
    units = {"Mi": 1.0, "Gi": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_app_and_the_exporter_share_the_ingestions_volume(manifests: list[Manifest]) -> None:
    """One emptyDir is mounted at /var/run/catalog-ingestions in both containers."""
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    shared = set()
    for container in (app_container(manifests), exporter_container(manifests)):
        mounts = [m for m in container["volumeMounts"] if m["mountPath"] == INGESTIONS_DIR]
        assert len(mounts) == 1, container["name"]
        shared.add(mounts[0]["name"])
    assert len(shared) == 1
    assert "emptyDir" in volumes[shared.pop()]
    app_mount = [
        m for m in app_container(manifests)["volumeMounts"] if m["mountPath"] == INGESTIONS_DIR
    ]
    assert not app_mount[0].get("readOnly", False), "the application writes the ids"


_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}


def test_the_exporter_consumes_the_ingestions_volume_and_knows_its_size_limit(
    manifests: list[Manifest],
) -> None:
    """Spool mode, a read-write mount, and directory_size_limit_bytes equal to the emptyDir's
    sizeLimit (the filling alert compares the directory's bytes with it)."""
    document = yaml.safe_load(next(iter(exporter_configmap(manifests)["data"].values())))
    assert document["ingestions"]["directory_mode"] == "spool"
    mounts = [
        m for m in exporter_container(manifests)["volumeMounts"] if m["mountPath"] == INGESTIONS_DIR
    ]
    assert not mounts[0].get("readOnly", False), "spool mode deletes consumed files"
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    limit = volumes[mounts[0]["name"]]["emptyDir"]["sizeLimit"]
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", limit).groups()  # type: ignore[union-attr]
    assert document["ingestions"]["directory_size_limit_bytes"] == int(number) * _QUANTITY[unit]


def test_the_exporter_reads_its_config_from_the_generated_configmap(
    manifests: list[Manifest],
) -> None:
    """--config names a key of the hashed ConfigMap, mounted read-only at that directory."""
    exporter = exporter_container(manifests)
    args = exporter["args"]
    assert args[:1] == ["--config"] and args[2:] == ["--on-invalid-config=serve"]
    config_dir, _, key = args[1].rpartition("/")
    assert config_dir == "/etc/catalog-upload-exporter"
    configmap = exporter_configmap(manifests)
    assert re.fullmatch(
        r"catalog-upload-exporter-config-[a-z0-9]{10}", configmap["metadata"]["name"]
    )
    assert key in configmap["data"]
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    mounts = [m for m in exporter["volumeMounts"] if m["mountPath"] == config_dir]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    assert volumes[mounts[0]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]


def test_the_api_token_secret_is_mounted_optionally(manifests: list[Manifest]) -> None:
    """The bearer token Secret is a file under /var/run/secrets/catalog, optional for sigv4."""
    secret = one(manifests, "Secret", "catalog-api-token")
    assert set(secret["stringData"]) == {"token"}
    mounts = [
        m for m in exporter_container(manifests)["volumeMounts"] if m["mountPath"] == TOKEN_DIR
    ]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    source = volumes[mounts[0]["name"]]["secret"]
    assert source["secretName"] == "catalog-api-token"
    assert source["optional"] is True
    app_mounts = {m["mountPath"] for m in app_container(manifests).get("volumeMounts", [])}
    assert TOKEN_DIR not in app_mounts, "only the exporter sees the token"


def test_the_generated_config_is_valid_and_listens_on_the_container_port(
    manifests: list[Manifest], tmp_path: Path
) -> None:
    """The exporter's own loader accepts the ConfigMap's file, without environment variables,
    and its server port is the container's metrics port."""
    configmap = exporter_configmap(manifests)
    (text,) = configmap["data"].values()
    document = yaml.safe_load(text)
    # The loader checks that the state file's directory exists: here, that is a volume of the
    # pod, so it must be one of the exporter's mounts; the watched directory must be too.
    mounts = {m["mountPath"]: m for m in exporter_container(manifests)["volumeMounts"]}
    state_dir = str(Path(document["state"]["path"]).parent)
    assert state_dir in mounts and not mounts[state_dir].get("readOnly")
    assert document["ingestions"]["directory"] in mounts
    local_state_dir = tmp_path / "state"
    local_state_dir.mkdir()
    document["state"]["path"] = str(local_state_dir / Path(document["state"]["path"]).name)
    config = parse_config(document, environ={})
    assert config.admin.host == "127.0.0.1", "the admin API stays inside the pod"
    assert config.server.port == metrics_port(manifests)
    assert ipaddress.ip_address(config.server.host).is_unspecified, "probes come from outside"
    assert config.api.auth.type == "sigv4"
    assert config.api.auth.region
    assert config.logging.format == "json"
    assert text == (SIDECAR / "exporter-config.yaml").read_text(encoding="utf-8")


def test_the_dashboard_configmap_has_a_fixed_name_and_the_grafana_label(
    manifests: list[Manifest],
) -> None:
    """The dashboard ConfigMap keeps its name (no hash), carries grafana_dashboard: "1" and
    holds the dashboard file unchanged."""
    configmap = one(manifests, "ConfigMap", "catalog-upload-exporter-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (name, text), *rest = configmap["data"].items()
    assert not rest and name.endswith(".json")
    assert json.loads(text) == json.loads(DASHBOARD.read_text(encoding="utf-8"))


def test_the_service_account_is_annotated_for_irsa_and_mounts_no_api_token(
    manifests: list[Manifest],
) -> None:
    """The pod runs as the ServiceAccount carrying the IRSA role ARN, with no API token."""
    account = one(manifests, "ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role)
    assert account["automountServiceAccountToken"] is False
    spec = pod_spec(manifests)
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["automountServiceAccountToken"] is False


#: The exporter's own pod annotations, read by deploy/prometheus/scrape-config.yml.
SCRAPE_ANNOTATIONS = {
    "catalog-upload-exporter/scrape": "true",
    "catalog-upload-exporter/port": "10184",
    "catalog-upload-exporter/path": "/metrics",
}


def test_the_pod_annotations_point_plain_prometheus_at_the_exporter(
    manifests: list[Manifest], sharded: list[Manifest]
) -> None:
    """The exporter's own catalog-upload-exporter/scrape, /port and /path annotations, on the
    example's pods (from the sidecar component) and the shards', name its endpoint; no
    prometheus.io/* annotation is taken from the application."""
    for rendered, kind in ((manifests, "Deployment"), (sharded, "StatefulSet")):
        annotations = one(rendered, kind)["spec"]["template"]["metadata"]["annotations"]
        assert annotations == SCRAPE_ANNOTATIONS, kind
        assert annotations["catalog-upload-exporter/port"] == str(
            metrics_port_of_kind(rendered, kind)
        )


def scrape_jobs() -> list[dict[str, Any]]:
    document = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    assert set(document) == {"scrape_configs"}
    jobs: list[dict[str, Any]] = document["scrape_configs"]
    return jobs


def commented_static_job() -> list[dict[str, Any]]:
    """The commented-out static_configs example, uncommented."""
    lines = SCRAPE_CONFIG.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - job_name:"))
    example = [line.replace("  # ", "", 1) for line in lines[start:] if line.startswith("  # ")]
    jobs: list[dict[str, Any]] = yaml.safe_load("\n".join(example))
    return jobs


def test_the_scrape_config_passes_promtool_check_config(tmp_path: Path) -> None:
    """Wrapped in a minimal prometheus.yml, the snippet and its commented static example pass
    `promtool check config`.

    Debian builds Prometheus without Kubernetes discovery, so its promtool rejects the key
    `kubernetes_sd_configs`: that block is checked here by hand and stood in for by a
    static_configs block, so that promtool still checks everything else (relabel regexes,
    actions, intervals, job names)."""
    jobs = scrape_jobs()
    assert [job["job_name"] for job in jobs] == ["catalog-upload-exporter"]
    checked = []
    for job in jobs:
        (discovery,) = job.pop("kubernetes_sd_configs")
        assert discovery == {"role": "pod"}
        checked.append({**job, "static_configs": [{"targets": ["10.0.0.5:10184"]}]})
    static = commented_static_job()
    assert "static_configs" in static[0]
    # The two are alternatives with the same job name, so each is checked in its own file.
    for name, scrape_configs in (("discovery", checked), ("static", static)):
        wrapped = tmp_path / f"prometheus-{name}.yml"
        wrapped.write_text(
            yaml.safe_dump({"global": {"scrape_interval": "1m"}, "scrape_configs": scrape_configs}),
            encoding="utf-8",
        )
        run(require_tool("promtool"), "check", "config", str(wrapped))


#: A job matcher in the rules: `job="..."`, `job=~"..."` (and their negations, refused here).
JOB_MATCHER = re.compile(r'\bjob\s*(=~|!~|!=|=)\s*"([^"]*)"')


def rules_job_matchers() -> list[tuple[str, str]]:
    """Every (operator, value) job matcher in the rules file."""
    return JOB_MATCHER.findall(RULES_FILE.read_text(encoding="utf-8"))


def assert_every_job_matcher_accepts(job: str) -> None:
    """Each job matcher of the rules selects series whose job label is `job`."""
    matchers = rules_job_matchers()
    assert matchers
    for operator, value in matchers:
        assert operator in {"=", "=~"}, f"a negative job matcher: job{operator}{value!r}"
        matches = job == value if operator == "=" else re.fullmatch(value, job) is not None
        assert matches, f"job {job!r} is not selected by job{operator}{value!r}"


def podmonitor_job(monitor: Manifest) -> str:
    """The job label a PodMonitor's single endpoint gives its series: the last relabeling that
    writes `job`, else the operator's default `<namespace>/<name>`."""
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert "jobLabel" not in monitor["spec"]
    job = None
    for rule in endpoint.get("relabelings", []):
        if rule.get("targetLabel") == "job":
            assert rule.get("action", "replace") == "replace" and "sourceLabels" not in rule
            job = rule["replacement"]
    namespace = monitor["metadata"].get("namespace", "default")
    return job if job is not None else f"{namespace}/{monitor['metadata']['name']}"


def test_every_way_of_scraping_names_a_job_the_alerts_select(
    manifests: list[Manifest],
) -> None:
    """The scrape config's jobs, the ServiceMonitor's Service (its job label) and the
    PodMonitor's job are each accepted by every job matcher of the rules, which are all the
    Makefile's EXPORTER_JOB."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    (exporter_job,) = re.findall(r"^EXPORTER_JOB \?= (.+)$", makefile, re.MULTILINE)
    assert {value for _, value in rules_job_matchers()} == {exporter_job}
    names = {job["job_name"] for job in scrape_jobs() + commented_static_job()}
    service = one(manifests, "Service")
    monitor = one(manifests, "ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]  # so the job label is the Service's name
    names.add(service["metadata"]["name"])
    names.add(podmonitor_job(one(kustomize(PODMONITOR), "PodMonitor")))
    for name in names:
        assert_every_job_matcher_accepts(name)


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' keep, drop and replace actions (anchored RE2 regexes, `;` separator); None
    when the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if (action == "keep" and not match) or (action == "drop" and match):
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(replacement)
    return labels


@pytest.mark.parametrize(
    ("pod", "address"),
    [
        (
            {"__address__": "10.0.0.5:8080", "__meta_kubernetes_pod_ip": "10.0.0.5"},
            "10.0.0.5:10184",
        ),
        ({"__address__": "10.0.0.5", "__meta_kubernetes_pod_ip": "10.0.0.5"}, "10.0.0.5:10184"),
        (
            {"__address__": "[fd00::5]:8080", "__meta_kubernetes_pod_ip": "fd00::5"},
            "[fd00::5]:10184",
        ),
    ],
)
def test_the_scrape_config_points_an_annotated_pod_at_the_exporter_port(
    pod: dict[str, str], address: str
) -> None:
    """Whatever container port discovery found, a pod with the exporter's annotations is
    scraped on the exporter's port and path, with namespace and pod labels, even when its
    prometheus.io/* annotations point at the application's own port; without them it is not."""
    (job,) = scrape_jobs()
    annotated = {
        **pod,
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": "shop",
        "__meta_kubernetes_pod_name": "catalog-uploader-abc",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_annotation_catalog_upload_exporter_scrape": "true",
        "__meta_kubernetes_pod_annotation_catalog_upload_exporter_port": "10184",
        "__meta_kubernetes_pod_annotation_catalog_upload_exporter_path": "/metrics",
        # The application's own annotations, for a generic job: left alone here.
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": "8080",
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/app-metrics",
    }
    result = relabel(annotated, job["relabel_configs"])
    assert result is not None
    assert result["__address__"] == address
    assert result["__metrics_path__"] == "/metrics"
    assert result["namespace"] == "shop" and result["pod"] == "catalog-uploader-abc"
    not_annotated = {
        k: v for k, v in annotated.items() if "catalog_upload_exporter_scrape" not in k
    }
    assert relabel(not_annotated, job["relabel_configs"]) is None
    finished = {**annotated, "__meta_kubernetes_pod_phase": "Succeeded"}
    assert relabel(finished, job["relabel_configs"]) is None


# The sharded overlay: the exporter alone, as a StatefulSet whose replicas split the ids.


@pytest.fixture(scope="module")
def sharded() -> list[Manifest]:
    """Everything `kubectl apply -k deploy/overlays/sharded` would send."""
    return kustomize(SHARDED)


def sharded_document(sharded: list[Manifest]) -> dict[str, Any]:
    (text,) = exporter_configmap(sharded)["data"].values()
    assert text == (SHARDED / "exporter-config.yaml").read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def parse_sharded_config(sharded: list[Manifest], tmp_path: Path, hostname: str) -> Any:
    """The overlay's config as the pod named `hostname` loads it, its state directory (a
    volume of the pod) stood in for by a temporary one."""
    document = sharded_document(sharded)
    local_state_dir = tmp_path / "state"
    local_state_dir.mkdir(exist_ok=True)
    document["state"]["path"] = str(local_state_dir / Path(document["state"]["path"]).name)
    return parse_config(document, environ={}, hostname=hostname)


def test_the_sharded_overlay_renders_a_statefulset_and_no_application(
    sharded: list[Manifest],
) -> None:
    """`kubectl kustomize deploy/overlays/sharded` gives the exporter's StatefulSet with the
    base's monitoring, identity and token objects, and neither the app nor its sidecar."""
    assert Counter(m["kind"] for m in sharded) == Counter(
        {
            "StatefulSet": 1,
            "ConfigMap": 1,
            "Secret": 1,
            "Service": 1,
            "ServiceAccount": 1,
            "ServiceMonitor": 1,
            "PrometheusRule": 1,
        }
    )
    assert all("namespace" not in m["metadata"] for m in sharded), "namespace is the user's"
    for manifest in sharded:
        assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == (
            "catalog-upload-exporter"
        )
    statefulset = one(sharded, "StatefulSet", "catalog-upload-exporter")
    spec = statefulset["spec"]["template"]["spec"]
    assert "initContainers" not in spec and len(spec["containers"]) == 1, "standalone"


def test_the_sharded_overlays_core_objects_validate_strictly(sharded: list[Manifest]) -> None:
    """Each built-in kind of the overlay is valid for the checked Kubernetes versions."""
    core = [m for m in sharded if m["apiVersion"] != OPERATOR_API]
    assert {m["kind"] for m in core} == {
        "StatefulSet",
        "ConfigMap",
        "Secret",
        "Service",
        "ServiceAccount",
    }
    problems = schema_problems(core)
    assert not problems, "\n".join(problems)


def test_the_statefulset_runs_as_many_replicas_as_the_config_has_shards(
    sharded: list[Manifest],
) -> None:
    """replicas equals sharding.total, each pod's index comes from its name (index null), and
    HOSTNAME is the pod's name."""
    statefulset = one(sharded, "StatefulSet")
    sharding = sharded_document(sharded)["sharding"]
    assert statefulset["spec"]["replicas"] == sharding["total"] == 3
    assert sharding["index"] is None
    env = {e["name"]: e for e in exporter_container(sharded, "StatefulSet").get("env", [])}
    assert env["HOSTNAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_statefulset_is_governed_by_a_headless_service_that_selects_its_pods(
    sharded: list[Manifest],
) -> None:
    """serviceName names a Service with clusterIP None, whose selector picks the pods, and
    whose port "metrics" is the container's."""
    statefulset = one(sharded, "StatefulSet")
    service = one(sharded, "Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    template_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    ports = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
    assert len(ports) == 1
    assert ports[0]["targetPort"] in {"metrics", metrics_port_of(sharded)}
    assert ports[0]["port"] == metrics_port_of(sharded) == 10184


def metrics_port_of(sharded: list[Manifest]) -> int:
    ports = [
        p for p in exporter_container(sharded, "StatefulSet")["ports"] if p["name"] == "metrics"
    ]
    assert len(ports) == 1
    port: int = ports[0]["containerPort"]
    return port


def test_the_base_servicemonitor_scrapes_every_replica_through_the_headless_service(
    manifests: list[Manifest], sharded: list[Manifest]
) -> None:
    """The base's ServiceMonitor, unchanged in the overlay, selects the headless Service by
    its labels and scrapes its port "metrics"; the job label (the Service's name) is the one
    the alerts expect."""
    monitor = one(manifests, "ServiceMonitor")
    assert one(sharded, "ServiceMonitor") == monitor
    service = one(sharded, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= service["metadata"]["labels"].items()
    assert "metrics" in {port["name"] for port in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    assert service["metadata"]["name"] == one(manifests, "Service")["metadata"]["name"]
    assert one(sharded, "PrometheusRule") == one(manifests, "PrometheusRule")


def test_the_statefulsets_pod_is_locked_down_like_the_sidecar(
    manifests: list[Manifest], sharded: list[Manifest]
) -> None:
    """The shards pass the security checks and keep the sidecar's security contexts, liveness
    probe, resources, image, metrics port and service account; alone in their pods they gate
    no app, so they fail fast on an invalid config and keep a readiness probe on /readyz."""
    spec = pod_spec(sharded, "StatefulSet")
    assert_locked_down(spec)
    base_spec = pod_spec(manifests)
    assert spec["securityContext"] == base_spec["securityContext"]
    assert spec["serviceAccountName"] == base_spec["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is False
    shard, sidecar = exporter_container(sharded, "StatefulSet"), exporter_container(manifests)
    for key in ("image", "securityContext", "resources", "livenessProbe"):
        assert shard[key] == sidecar[key], key
    # No app beside a shard, so no signing proxy: only the sidecar lists the proxy's port.
    assert shard["ports"] == [p for p in sidecar["ports"] if p["name"] != "catalog-proxy"]
    assert shard["args"] == [a for a in sidecar["args"] if not a.startswith("--on-invalid")]
    assert shard["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_each_shard_keeps_its_state_on_its_own_small_volume(sharded: list[Manifest]) -> None:
    """state.path lies on a volumeClaimTemplate's mount (one ReadWriteOnce claim per pod, of
    at most 64Mi); the config is the hashed ConfigMap, mounted read-only."""
    statefulset = one(sharded, "StatefulSet")
    document = sharded_document(sharded)
    mounts = {m["mountPath"]: m for m in exporter_container(sharded, "StatefulSet")["volumeMounts"]}
    state_mount = mounts[str(Path(document["state"]["path"]).parent)]
    assert not state_mount.get("readOnly")
    (claim,) = [
        t
        for t in statefulset["spec"]["volumeClaimTemplates"]
        if t["metadata"]["name"] == state_mount["name"]
    ]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] in {"16Mi", "32Mi", "64Mi"}
    volumes = {v["name"]: v for v in pod_spec(sharded, "StatefulSet")["volumes"]}
    assert state_mount["name"] not in volumes, "a template, not a shared pod volume"
    config_mount = mounts["/etc/catalog-upload-exporter"]
    assert config_mount["readOnly"] is True
    configmap_name = exporter_configmap(sharded)["metadata"]["name"]
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap_name


def test_the_sharded_config_loads_in_each_pod_with_its_ordinal_as_index(
    sharded: list[Manifest], tmp_path: Path
) -> None:
    """Pod catalog-upload-exporter-2 loads the config as shard 2 of 3, and every pod of the
    StatefulSet gets its own index; a pod beyond the replicas is refused."""
    config = parse_sharded_config(sharded, tmp_path, "catalog-upload-exporter-2")
    assert (config.sharding.index, config.sharding.total) == (2, 3)
    replicas = one(sharded, "StatefulSet")["spec"]["replicas"]
    indexes = [
        parse_sharded_config(sharded, tmp_path, f"catalog-upload-exporter-{ordinal}").sharding.index
        for ordinal in range(replicas)
    ]
    assert indexes == list(range(replicas))
    with pytest.raises(ConfigError, match=r"sharding\.index: hostname"):
        parse_sharded_config(sharded, tmp_path, f"catalog-upload-exporter-{replicas}")
    assert config.server.port == metrics_port_of(sharded)
    assert ipaddress.ip_address(config.server.host).is_unspecified, "probes come from outside"
    assert config.api.auth.type == "sigv4" and config.api.auth.region


def test_the_replicas_together_stay_within_the_apis_request_budget(
    sharded: list[Manifest], tmp_path: Path
) -> None:
    """api.max_requests_per_second is per replica: times sharding.total it is at most the
    API's 10 requests/s, and it uses most of that budget."""
    config = parse_sharded_config(sharded, tmp_path, "catalog-upload-exporter-0")
    budget = config.api.max_requests_per_second * config.sharding.total
    assert API_REQUESTS_PER_SECOND / 2 < budget <= API_REQUESTS_PER_SECOND


def test_the_sharded_config_takes_no_ids_from_a_single_replicas_admin_api(
    sharded: list[Manifest], tmp_path: Path
) -> None:
    """Registrations through one replica's admin API would reach that replica only, so the
    overlay turns the admin API off; ids come from the config or a shared directory."""
    config = parse_sharded_config(sharded, tmp_path, "catalog-upload-exporter-0")
    assert config.admin.enabled is False


# The sidecar component, added to a user's own workloads (tests/fixtures/sidecar-app).

SIDECAR_APP = ROOT / "tests" / "fixtures" / "sidecar-app"
SIDECAR_LABEL = ("catalog-upload-exporter/sidecar", "enabled")


@pytest.fixture(scope="module")
def sidecar_app() -> list[Manifest]:
    """The sample user application, with the component and the user's own config, rendered."""
    return kustomize(SIDECAR_APP)


def sidecar_patch() -> Manifest:
    """The component's patch: the exporter container and the volumes it brings."""
    patch: Manifest = yaml.safe_load((SIDECAR / "sidecar.yaml").read_text(encoding="utf-8"))
    spec: Manifest = patch["spec"]["template"]["spec"]
    return spec


def user_workloads() -> list[Manifest]:
    text = (SIDECAR_APP / "workloads.yaml").read_text(encoding="utf-8")
    return [document for document in yaml.safe_load_all(text) if document]


def is_labelled(workload: Manifest) -> bool:
    key, value = SIDECAR_LABEL
    return bool(workload["metadata"].get("labels", {}).get(key) == value)


def without_sidecar(workload: Manifest) -> Manifest:
    """A rendered workload with the component's container and volumes taken out again."""
    patch = sidecar_patch()
    added_volumes = {volume["name"] for volume in patch["volumes"]}
    copy: Manifest = yaml.safe_load(yaml.safe_dump(workload))
    spec = copy["spec"]["template"]["spec"]
    spec["initContainers"] = [
        c for c in spec["initContainers"] if c["name"] != "catalog-upload-exporter"
    ]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in added_volumes]
    for key in ("initContainers", "volumes"):
        if not spec[key]:
            del spec[key]
    metadata = copy["spec"]["template"]["metadata"]
    added = yaml.safe_load((SIDECAR / "sidecar.yaml").read_text(encoding="utf-8"))
    for key, values in added["spec"]["template"]["metadata"].items():
        for name in values:
            del metadata[key][name]
        if not metadata[key]:
            del metadata[key]
    return copy


def test_the_sidecar_component_adds_the_exporter_to_labelled_workloads_only(
    sidecar_app: list[Manifest],
) -> None:
    """Each labelled Deployment and StatefulSet gets the component's exporter as its first
    init container (a native sidecar, so it starts before the user's own init containers);
    the unlabelled Deployment comes out exactly as it went in."""
    workloads = user_workloads()
    assert sorted((w["kind"], is_labelled(w)) for w in workloads) == [
        ("Deployment", False),
        ("Deployment", True),
        ("StatefulSet", True),
    ]
    (exporter,) = sidecar_patch()["initContainers"]
    assert exporter["restartPolicy"] == "Always"
    for workload in workloads:
        rendered = one(sidecar_app, workload["kind"], workload["metadata"]["name"])
        spec = rendered["spec"]["template"]["spec"]
        if is_labelled(workload):
            assert spec["initContainers"][0] == exporter, workload["metadata"]["name"]
        else:
            assert rendered == workload


def test_the_exporter_rendered_into_the_users_app_gates_neither_its_start_nor_its_readiness(
    sidecar_app: list[Manifest],
) -> None:
    """In every labelled workload of the sample app the exporter has no startupProbe and no
    readinessProbe on /readyz, and runs with --on-invalid-config=serve."""
    labelled = list(filter(is_labelled, user_workloads()))
    assert labelled
    for workload in labelled:
        rendered = one(sidecar_app, workload["kind"], workload["metadata"]["name"])
        exporter = rendered["spec"]["template"]["spec"]["initContainers"][0]
        assert exporter["name"] == "catalog-upload-exporter"
        assert_gates_nothing(exporter)
        assert "--on-invalid-config=serve" in exporter["args"]


def test_the_users_own_containers_and_volumes_stay_as_they_were(
    sidecar_app: list[Manifest],
) -> None:
    """Taking the component's container and volumes out of a labelled workload gives back the
    user's manifest unchanged: containers, init containers, volumes, pod securityContext."""
    for workload in user_workloads():
        if is_labelled(workload):
            rendered = one(sidecar_app, workload["kind"], workload["metadata"]["name"])
            assert without_sidecar(rendered) == workload


def test_the_sidecar_brings_its_volumes_and_the_users_config(
    sidecar_app: list[Manifest], tmp_path: Path
) -> None:
    """Every volume the exporter mounts is in the pod; the config volume names the one hashed
    ConfigMap, which holds the user's config (replacing the component's default), and the
    exporter's loader accepts it with the state directory on a writable mount."""
    configmap = exporter_configmap(sidecar_app)
    user_config = (SIDECAR_APP / "exporter-config" / "exporter-config.yaml").read_text()
    assert configmap["data"] == {"config.yaml": user_config}
    for labelled in filter(is_labelled, user_workloads()):
        workload = one(sidecar_app, labelled["kind"], labelled["metadata"]["name"])
        spec = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        exporter = spec["initContainers"][0]
        mounts = {m["mountPath"]: m for m in exporter["volumeMounts"]}
        assert {m["name"] for m in mounts.values()} <= volumes.keys()
        assert volumes["exporter-config"]["configMap"]["name"] == configmap["metadata"]["name"]
        assert "emptyDir" in volumes["exporter-state"] and "emptyDir" in volumes["ingestions"]
        assert volumes["catalog-api-token"]["secret"]["optional"] is True
        document = yaml.safe_load(user_config)
        state_dir = str(Path(document["state"]["path"]).parent)
        assert state_dir in mounts and not mounts[state_dir].get("readOnly")
        assert str(Path(document["api"]["auth"]["token_file"]).parent) in mounts
    # The loader checks that these paths exist: here they are the pod's mounts, checked above.
    document["state"]["path"] = str(tmp_path / "state.json")
    token = tmp_path / "token"
    token.write_text("t0ken\n", encoding="utf-8")
    document["api"]["auth"]["token_file"] = str(token)
    config = parse_config(document, environ={})
    assert config.server.port == 10184 == exporter["ports"][0]["containerPort"]


def test_the_sidecar_is_restricted_by_itself_and_validates_strictly(
    sidecar_app: list[Manifest],
) -> None:
    """The exporter container meets Pod Security "restricted" with its own securityContext
    (the pod's stays the user's), and every rendered object is valid for the checked
    Kubernetes versions, unknown fields included (the PodMonitor against the operator's
    schema, in tests/test_operator_objects.py)."""
    for labelled in filter(is_labelled, user_workloads()):
        workload = one(sidecar_app, labelled["kind"], labelled["metadata"]["name"])
        (exporter, *_) = workload["spec"]["template"]["spec"]["initContainers"]
        assert_container_locked_down(exporter)
        assert exporter["livenessProbe"]["httpGet"]["port"] == "metrics"
    problems = schema_problems([m for m in sidecar_app if m["apiVersion"] != OPERATOR_API])
    assert not problems, "\n".join(problems)


def test_deploy_kubernetes_takes_its_sidecar_from_the_component(manifests: list[Manifest]) -> None:
    """The example application's manifest holds no exporter container of its own: the one in
    `kubectl apply -k deploy` is the component's, added through the label."""
    raw = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text(encoding="utf-8"))
    assert is_labelled(raw)
    assert EXPORTER_IMAGE not in json.dumps(raw)
    (component_exporter,) = sidecar_patch()["initContainers"]
    assert exporter_container(manifests) == component_exporter


SIDECAR_SQS = DEPLOY / "components" / "sidecar-sqs"


@pytest.fixture(scope="module")
def sidecar_sqs_app(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """The sample user application with the sidecar and the sidecar-sqs components, rendered."""
    app = tmp_path_factory.mktemp("sidecar-sqs-app")
    shutil.copy(SIDECAR_APP / "workloads.yaml", app)
    components = [os.path.relpath(path, app) for path in (SIDECAR, SIDECAR_SQS)]
    document = {"resources": ["workloads.yaml"], "components": components}
    (app / "kustomization.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    return kustomize(app)


def test_the_sidecar_sqs_component_differs_from_the_default_only_by_the_result_queue(
    sidecar_sqs_app: list[Manifest], tmp_path: Path
) -> None:
    """Listed after the sidecar, sidecar-sqs puts its config in the one hashed ConfigMap that
    every labelled workload mounts; the config is the sidecar's default plus a queue with
    register_unknown (docs/deploying.md, "Rollouts: uploads in flight"), so the two cannot
    drift, and the exporter's loader accepts it. The rendered objects validate strictly."""
    configmap = exporter_configmap(sidecar_sqs_app)
    text = (SIDECAR_SQS / "exporter-config.yaml").read_text(encoding="utf-8")
    assert configmap["data"] == {"config.yaml": text}
    for labelled in filter(is_labelled, user_workloads()):
        workload = one(sidecar_sqs_app, labelled["kind"], labelled["metadata"]["name"])
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["exporter-config"]["configMap"]["name"] == configmap["metadata"]["name"]
    document = yaml.safe_load(text)
    default = yaml.safe_load((SIDECAR / "exporter-config.yaml").read_text(encoding="utf-8"))
    assert {k: v for k, v in document.items() if k != "notifications"} == default
    document["state"]["path"] = str(tmp_path / "state.db")
    config = parse_config(document, environ={})
    assert config.notifications.sqs.queue_url.startswith("https://sqs.")
    assert config.notifications.sqs.register_unknown is True
    assert config.ingestions.directory == INGESTIONS_DIR
    problems = schema_problems([m for m in sidecar_sqs_app if m["apiVersion"] != OPERATOR_API])
    assert not problems, "\n".join(problems)


# Runbook links: RUNBOOK_BASE in the Makefile, applied by `make rules`.

PROMETHEUS_RULE = DEPLOY / "kubernetes" / "prometheusrule.yaml"


def make_rules(tmp_path: Path, *variables: str) -> tuple[Path, Path]:
    """`make rules` run on copies of the rules file and the PrometheusRule."""
    rules, prometheus_rule = tmp_path / RULES_FILE.name, tmp_path / PROMETHEUS_RULE.name
    shutil.copy(RULES_FILE, rules)
    shutil.copy(PROMETHEUS_RULE, prometheus_rule)
    run(
        require_tool("make"),
        "--silent",
        f"--directory={ROOT}",
        "rules",
        f"RULES_FILE={rules}",
        f"PROMETHEUS_RULE={prometheus_rule}",
        *variables,
    )
    return rules, prometheus_rule


def runbook_urls(path: Path) -> dict[str, set[str]]:
    """Every alert's runbook_url(s), by alert name, from a rules file or a PrometheusRule."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    groups = document["spec"]["groups"] if "spec" in document else document["groups"]
    urls: dict[str, set[str]] = {}
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                urls.setdefault(rule["alert"], set()).add(rule["annotations"]["runbook_url"])
    return urls


def test_make_rules_with_the_default_base_reproduces_the_committed_files(tmp_path: Path) -> None:
    """The committed rules file and PrometheusRule are what `make rules` writes: the Makefile's
    RUNBOOK_BASE is the one source of their runbook links."""
    rules, prometheus_rule = make_rules(tmp_path)
    assert rules.read_text(encoding="utf-8") == RULES_FILE.read_text(encoding="utf-8")
    assert prometheus_rule.read_text(encoding="utf-8") == PROMETHEUS_RULE.read_text(
        encoding="utf-8"
    )


def test_changing_the_runbook_base_changes_every_alerts_runbook_url(tmp_path: Path) -> None:
    """With RUNBOOK_BASE set to a wiki, every alert's runbook_url in both files is that base
    and the alert's own anchor, and the rules still pass promtool."""
    base = "https://wiki.example.com/runbooks/catalog-upload-exporter"
    rules, prometheus_rule = make_rules(tmp_path, f"RUNBOOK_BASE={base}")
    before = runbook_urls(RULES_FILE)
    assert before and all(urls for urls in before.values())
    for path in (rules, prometheus_rule):
        after = runbook_urls(path)
        assert after.keys() == before.keys()
        for alert, urls in after.items():
            anchors = {url.partition("#")[2] for url in before[alert]}
            assert urls == {f"{base}#{anchor}" for anchor in anchors}, alert
    document = yaml.safe_load(prometheus_rule.read_text(encoding="utf-8"))
    assert document["spec"] == yaml.safe_load(rules.read_text(encoding="utf-8"))
    run(require_tool("promtool"), "check", "rules", str(rules))


def test_make_rules_writes_the_job_matcher_into_every_rule_of_both_files(tmp_path: Path) -> None:
    """With EXPORTER_JOB set, every job matcher of the rules file and of the PrometheusRule is
    `job=~"<EXPORTER_JOB>"`, the runbook links stay, and promtool accepts the rules; a value
    that would break the sed expression or the quoting is refused."""
    job = "catalog-upload-exporter|shop/.*"
    rules, prometheus_rule = make_rules(tmp_path, f"EXPORTER_JOB={job}")
    before = RULES_FILE.read_text(encoding="utf-8")
    for path in (rules, prometheus_rule):
        text = path.read_text(encoding="utf-8")
        matchers = JOB_MATCHER.findall(text)
        assert len(matchers) == len(JOB_MATCHER.findall(before)) > 0
        assert set(matchers) == {("=~", job)}
    assert runbook_urls(rules) == runbook_urls(RULES_FILE)
    run(require_tool("promtool"), "check", "rules", str(rules))
    refused = subprocess.run(
        [
            require_tool("make"),
            "--silent",
            f"--directory={ROOT}",
            "rules",
            f"RULES_FILE={rules}",
            f"PROMETHEUS_RULE={prometheus_rule}",
            'EXPORTER_JOB=a"b',
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0 and "EXPORTER_JOB must be" in refused.stdout


def test_the_shipped_kubernetes_configs_expose_one_status_series_per_upload(
    manifests: list[Manifest], sharded: list[Manifest], tmp_path: Path
) -> None:
    """The sidecar component's and the sharded overlay's configs load with
    metrics.status_series active, the choice BENCHMARKS.md section 9 measured (a quarter of
    Prometheus' memory at 100,000 uploads); the exporter's own default stays all."""
    for rendered in (manifests, sharded):
        (text,) = exporter_configmap(rendered)["data"].values()
        document = yaml.safe_load(text)
        document["state"]["path"] = str(tmp_path / "state.db")
        config = parse_config(document, environ={}, hostname="catalog-upload-exporter-0")
        assert config.metrics.status_series == "active"
    minimal = parse_config(
        {"api": {"base_url": "http://127.0.0.1:1"}}, environ={"AWS_REGION": "us-east-1"}
    )
    assert minimal.metrics.status_series == "all"


# TLS on /metrics: deploy/components/tls, in the user's app and in deploy/kubernetes.

TLS = DEPLOY / "components" / "tls"
TLS_APP = ROOT / "tests" / "fixtures" / "tls-app"
TLS_EXAMPLE = ROOT / "tests" / "fixtures" / "tls-example"
CERT_MANAGER_API = "cert-manager.io/v1"


def tls_certificate(manifests: list[Manifest]) -> Manifest:
    """The exporter's serving Certificate: the one that is not a CA."""
    (found,) = [
        m for m in manifests if m["kind"] == "Certificate" and not m["spec"].get("isCA", False)
    ]
    return found


def assert_tls_wired(manifests: list[Manifest], workload: Manifest, tmp_path: Path) -> None:
    """The workload's exporter reads the component's web config, whose certificate and key
    are the files of the Certificate's Secret, mounted whole; its one probe (liveness) uses
    HTTPS, and the patch adds no probe that would gate the app."""
    spec = workload["spec"]["template"]["spec"]
    (exporter,) = [c for c in spec["initContainers"] if c["image"].startswith(EXPORTER_IMAGE)]
    (sidecar_exporter,) = sidecar_patch()["initContainers"]
    flag = exporter["args"].index("--web.config.file")
    assert exporter["args"][:flag] == sidecar_exporter["args"], "the sidecar's args, kept"
    web_config_path = Path(exporter["args"][flag + 1])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in exporter["volumeMounts"]}
    mount = mounts[str(web_config_path.parent)]
    assert "subPath" not in mount and mount["readOnly"]
    configmap = one(manifests, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    text = configmap["data"][web_config_path.name]
    (tmp_path / "web-config.yml").write_text(text, encoding="utf-8")
    tls = load_web_config(tmp_path / "web-config.yml").tls_server_config
    secret_name = tls_certificate(manifests)["spec"]["secretName"]
    for path, key in ((tls.cert_file, "tls.crt"), (tls.key_file, "tls.key")):
        secret_mount = mounts[str(Path(path).parent)]
        assert "subPath" not in secret_mount, "a Secret is updated in place only when whole"
        assert volumes[secret_mount["name"]]["secret"]["secretName"] == secret_name
        assert Path(path).name == key
    assert "startupProbe" not in exporter and "readinessProbe" not in exporter
    assert exporter["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert exporter["livenessProbe"]["httpGet"]["path"] in PROBE_PATHS, "open to basic auth"


def assert_monitor_verifies(endpoint: Manifest, manifests: list[Manifest]) -> None:
    """An endpoint scraped over HTTPS, verified with the CA in the Certificate's Secret,
    under a name the certificate holds."""
    certificate = tls_certificate(manifests)["spec"]
    assert endpoint["scheme"] == "https"
    tls = endpoint["tlsConfig"]
    assert tls["ca"]["secret"] == {"name": certificate["secretName"], "key": "ca.crt"}
    assert tls["serverName"] in certificate["dnsNames"]
    assert not tls.get("insecureSkipVerify", False)


def test_the_tls_component_turns_on_tls_in_the_users_app_and_its_podmonitor(
    tmp_path: Path,
) -> None:
    """Listed after the sidecar and podmonitor components, the tls component gives every
    labelled workload's exporter the web config (flag, volumes, HTTPS liveness), adds the
    Certificate, and the PodMonitor scrapes over HTTPS verifying the CA; unlabelled workloads
    and the core objects' validity are untouched."""
    rendered = kustomize(TLS_APP)
    plain = kustomize(SIDECAR_APP)
    labelled = [w for w in user_workloads() if is_labelled(w)]
    assert labelled
    for workload in labelled:
        assert_tls_wired(
            rendered, one(rendered, workload["kind"], workload["metadata"]["name"]), tmp_path
        )
    for workload in user_workloads():
        if not is_labelled(workload):
            name = workload["metadata"]["name"]
            assert one(rendered, workload["kind"], name) == one(plain, workload["kind"], name)
    (endpoint,) = one(rendered, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert_monitor_verifies(endpoint, rendered)
    (plain_endpoint,) = one(plain, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert {k: v for k, v in endpoint.items() if k not in {"scheme", "tlsConfig"}} == (
        plain_endpoint
    )
    core = [m for m in rendered if m["apiVersion"] not in {OPERATOR_API, CERT_MANAGER_API}]
    problems = schema_problems(core)
    assert not problems, "\n".join(problems)


def test_the_tls_component_turns_on_tls_in_deploy_kubernetes_and_its_servicemonitor(
    tmp_path: Path,
) -> None:
    """On deploy/kubernetes, the same component wires the example's exporter and makes its
    ServiceMonitor scrape over HTTPS, verifying the CA."""
    rendered = kustomize(TLS_EXAMPLE)
    assert_tls_wired(rendered, one(rendered, "Deployment"), tmp_path)
    (endpoint,) = one(rendered, "ServiceMonitor")["spec"]["endpoints"]
    assert_monitor_verifies(endpoint, rendered)
    kinds = Counter(m["kind"] for m in rendered if m["apiVersion"] == CERT_MANAGER_API)
    assert kinds == {"Issuer": 2, "Certificate": 2}


def test_the_tls_components_certificate_chain_issues_the_serving_certificate() -> None:
    """The bootstrap chain holds together: the serving Certificate's issuer is the CA Issuer,
    whose Secret is the CA Certificate's, itself issued by the self-signed Issuer."""
    documents = [d for d in yaml.safe_load_all((TLS / "certificate.yaml").read_text()) if d]
    issuers = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "Issuer"}
    certificates = [d["spec"] for d in documents if d["kind"] == "Certificate"]
    (ca,) = [c for c in certificates if c.get("isCA")]
    (serving,) = [c for c in certificates if not c.get("isCA")]
    assert "selfSigned" in issuers[ca["issuerRef"]["name"]]
    assert issuers[serving["issuerRef"]["name"]]["ca"]["secretName"] == ca["secretName"]
    assert "server auth" in serving["usages"]
