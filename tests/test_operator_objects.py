"""Prometheus Operator objects, the sidecar in a user's own app, and what each exporter watches.

Every PodMonitor, ServiceMonitor and PrometheusRule that a kustomization of this repository
renders is validated against the operator's own schemas: the npm package
`@kubernetes-models/prometheus-operator` (generated from the operator's API types), pinned by
tests/operator-schemas/package-lock.json and installed under .cache/npm by `make test`, run by
Node.js. A missing node or package fails these tests rather than skipping them.

A user's app, written here as docs/deploying.md ("Add it to your app") tells a user to write it,
is rendered with the components: its PodMonitor must select exactly the labelled workloads'
pods, validate, and give a job that every job matcher of the rules accepts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.test_manifests import (
    EXPORTER_IMAGE,
    OPERATOR_API,
    SIDECAR,
    assert_every_job_matcher_accepts,
    kustomize,
    podmonitor_job,
    schema_problems,
)

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / ".cache" / "npm" / "node_modules"
VALIDATOR = ROOT / "tests" / "operator-schemas" / "validate.mjs"
DEPLOYING = ROOT / "docs" / "deploying.md"
COMPONENT_URL = re.compile(
    r"https://github\.com/catalog-upload-exporter/catalog-upload-exporter//"
    r"(deploy/components/[a-z-]+)\?ref=\S+"
)
SIDECAR_LABEL = ("catalog-upload-exporter/sidecar", "enabled")

Manifest = dict[str, Any]


def kustomizations() -> list[Path]:
    """Every directory of the repository whose kustomization.yaml is a Kustomization (not a
    Component, which renders only as part of one)."""
    found = []
    for path in sorted(ROOT.glob("**/kustomization.yaml")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        if document.get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def validate_operator_objects(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """What the operator's schemas say of each manifest (validate.mjs's answer)."""
    assert (NODE_MODULES / "@kubernetes-models" / "prometheus-operator").is_dir(), (
        f"{NODE_MODULES} lacks @kubernetes-models/prometheus-operator: `make test` installs it"
    )
    result = subprocess.run(
        [require_tool("node"), str(VALIDATOR), str(NODE_MODULES)],
        input=json.dumps(manifests),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answers: list[dict[str, Any]] = json.loads(result.stdout)
    assert len(answers) == len(manifests)
    return answers


def test_every_kustomization_in_the_repository_is_found() -> None:
    """The walk finds the example, the whole deploy/, the sharded overlay and the fixture apps
    (so the tls component's PodMonitor and ServiceMonitor are validated below)."""
    found = {str(path.relative_to(ROOT)) for path in kustomizations()}
    assert found >= {
        "deploy",
        "deploy/kubernetes",
        "deploy/overlays/sharded",
        "tests/fixtures/sidecar-app",
        "tests/fixtures/tls-app",  # deploy/components/tls: the monitors over HTTPS
        "tests/fixtures/tls-example",
    }


def test_every_operator_object_validates_against_the_operators_schemas() -> None:
    """Each PodMonitor, ServiceMonitor and PrometheusRule rendered by any kustomization of the
    repository passes the operator's schemas; all three kinds occur."""
    objects: dict[tuple[str, str, str], Manifest] = {}
    for directory in kustomizations():
        for manifest in kustomize(directory):
            if manifest["apiVersion"] == OPERATOR_API:
                key = (
                    str(directory.relative_to(ROOT)),
                    manifest["kind"],
                    manifest["metadata"]["name"],
                )
                objects[key] = manifest
    assert {kind for _, kind, _ in objects} == {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    answers = validate_operator_objects(list(objects.values()))
    problems = [
        f"{where}: {answer['kind']} {answer['name']}: {error}"
        for (where, _, _), answer in zip(objects, answers, strict=True)
        for error in answer["errors"]
    ]
    assert problems == []


def test_the_schemas_refuse_a_broken_monitor_and_an_unknown_kind() -> None:
    """The validator can fail: a numeric port name, a rule without expr, and a kind it does
    not know are each refused with the path of the problem."""
    monitor = yaml.safe_load((ROOT / "deploy/components/podmonitor/podmonitor.yaml").read_text())
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 10184
    rule = {
        "apiVersion": OPERATOR_API,
        "kind": "PrometheusRule",
        "metadata": {"name": "broken"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "NoExpr"}]}]},
    }
    unknown = {"apiVersion": OPERATOR_API, "kind": "ScrapeEverything", "metadata": {"name": "x"}}
    broken, no_expr, not_known = validate_operator_objects([monitor, rule, unknown])
    assert any("/spec/podMetricsEndpoints/0/port" in e for e in broken["errors"]), broken
    assert any("expr" in e for e in no_expr["errors"]), no_expr
    assert not_known["errors"], not_known


# A user's app, as the docs say to write it.

#: The user's workloads: two labelled (a Deployment that writes upload files, a StatefulSet
#: that registers through the admin API) and one that is not.
USER_WORKLOADS = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: checkout-feed
  labels:
    app.kubernetes.io/name: checkout-feed
    catalog-upload-exporter/sidecar: enabled
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: checkout-feed
  template:
    metadata:
      labels:
        app.kubernetes.io/name: checkout-feed
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "9090"
    spec:
      containers:
        - name: feed
          image: registry.example.com/checkout-feed:3.1.0
          ports:
            - name: metrics
              containerPort: 9090
          volumeMounts:
            - name: ingestions
              mountPath: /var/run/catalog-ingestions
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: price-batch
  labels:
    catalog-upload-exporter/sidecar: enabled
spec:
  serviceName: price-batch
  selector:
    matchLabels:
      app.kubernetes.io/name: price-batch
  template:
    metadata:
      labels:
        app.kubernetes.io/name: price-batch
    spec:
      containers:
        - name: batch
          image: registry.example.com/price-batch:1.0.0
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: storefront
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: storefront
  template:
    metadata:
      labels:
        app.kubernetes.io/name: storefront
    spec:
      containers:
        - name: web
          image: registry.example.com/storefront:7.0.0
"""


def documented_kustomization() -> tuple[str, str]:
    """The first YAML block of "Add it to your app" in docs/deploying.md, and that section."""
    text = DEPLOYING.read_text(encoding="utf-8")
    section = text.split("## Add it to your app", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    return block, section


def write_user_app(directory: Path) -> Path:
    """The user's app in `directory`: the docs' kustomization (component URLs pointing at this
    checkout), the workloads, and the config Component the docs describe, starting from a copy
    of the component's default config."""
    block, _ = documented_kustomization()
    app = directory / "app"
    app.mkdir()

    def local(match: re.Match[str]) -> str:
        return os.path.relpath(ROOT / match.group(1), app)

    (app / "kustomization.yaml").write_text(COMPONENT_URL.sub(local, block), encoding="utf-8")
    (app / "deployment.yaml").write_text(USER_WORKLOADS, encoding="utf-8")
    config = app / "exporter-config"
    config.mkdir()
    (config / "exporter-config.yaml").write_text(
        (SIDECAR / "exporter-config.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (config / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1alpha1",
                "kind": "Component",
                "configMapGenerator": [
                    {
                        "name": "catalog-upload-exporter-config",
                        "behavior": "replace",
                        "files": ["config.yaml=exporter-config.yaml"],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    return app


@pytest.fixture(scope="module")
def user_app(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """The user's app, rendered by `kubectl kustomize` as the docs say."""
    return kustomize(write_user_app(tmp_path_factory.mktemp("user-app")))


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only, as ours is) against a pod's labels."""
    assert set(selector) == {"matchLabels"}
    return bool(selector["matchLabels"].items() <= labels.items())


def test_the_docs_cover_scraping_in_three_lines_or_fewer() -> None:
    """ "Add it to your app" lists both components in its kustomization and says what to do
    without the operator in one paragraph of at most three lines."""
    block, section = documented_kustomization()
    assert {m.group(1) for m in COMPONENT_URL.finditer(block)} == {
        "deploy/components/sidecar",
        "deploy/components/podmonitor",
    }
    paragraph = next(p for p in section.split("\n\n") if p.startswith("Scraping:"))
    assert len(paragraph.strip().splitlines()) <= 3, paragraph


def test_the_podmonitor_selects_exactly_the_labelled_workloads_pods(
    user_app: list[Manifest],
) -> None:
    """In the user's rendered app, one PodMonitor in the app's namespace selects the pod
    template of each labelled workload and of no other, scrapes the port "metrics" of the
    exporter's container only (the app's own port "metrics" is not scraped), and validates."""
    (monitor,) = [m for m in user_app if m["kind"] == "PodMonitor"]
    workloads = [m for m in user_app if m["kind"] in {"Deployment", "StatefulSet"}]
    assert len(workloads) == 3
    namespace = monitor["metadata"]["namespace"]
    assert namespace == "shop"
    assert "namespaceSelector" not in monitor["spec"], "its own namespace only"
    key, value = SIDECAR_LABEL
    for workload in workloads:
        assert workload["metadata"]["namespace"] == namespace
        labelled = workload["metadata"].get("labels", {}).get(key) == value
        template = workload["spec"]["template"]
        assert selects(monitor["spec"]["selector"], template["metadata"]["labels"]) == labelled
        containers = template["spec"].get("initContainers", []) + template["spec"]["containers"]
        exporters = [c for c in containers if c["image"].startswith(EXPORTER_IMAGE)]
        assert len(exporters) == (1 if labelled else 0), workload["metadata"]["name"]
        if labelled:
            (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
            (exporter,) = exporters
            assert endpoint["port"] in {p["name"] for p in exporter["ports"]}
            keep = [r for r in endpoint["relabelings"] if r.get("action") == "keep"]
            assert keep == [
                {
                    "sourceLabels": ["__meta_kubernetes_pod_container_name"],
                    "action": "keep",
                    "regex": exporter["name"],
                }
            ]
    (answer,) = validate_operator_objects([monitor])
    assert answer["errors"] == []
    problems = schema_problems([m for m in user_app if m["apiVersion"] != OPERATOR_API])
    assert problems == []


def test_the_user_apps_job_is_accepted_by_every_job_matcher_of_the_rules(
    user_app: list[Manifest],
) -> None:
    """The job the PodMonitor gives the user's pods is selected by each job matcher of the
    rules (and is not the operator's default "<namespace>/<name>")."""
    (monitor,) = [m for m in user_app if m["kind"] == "PodMonitor"]
    job = podmonitor_job(monitor)
    assert "/" not in job
    assert_every_job_matcher_accepts(job)


# What each exporter watches.


def exporter_config_of(manifests: list[Manifest], pod: Manifest) -> dict[str, Any]:
    """The exporter config a pod spec mounts: its ConfigMap's single file, parsed."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    configmap_name = volumes["exporter-config"]["configMap"]["name"]
    (configmap,) = [
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == configmap_name
    ]
    (text,) = configmap["data"].values()
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def written_directories(pod: Manifest, exporter: Manifest) -> set[str]:
    """Where the exporter sees what the pod's other containers write: the exporter's mount
    paths of the volumes that another container mounts writable."""
    others = [c for c in pod.get("initContainers", []) + pod["containers"] if c is not exporter]
    written = {
        m["name"] for c in others for m in c.get("volumeMounts", []) if not m.get("readOnly")
    }
    return {m["mountPath"] for m in exporter.get("volumeMounts", []) if m["name"] in written}


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_exporter_watches_the_directory_its_pods_app_writes_to(directory: Path) -> None:
    """For every workload with the exporter in every kustomization: when another container of
    the pod writes to a volume the exporter mounts, ingestions.directory is that mount; else
    a watched directory, if any, is one of the exporter's mounts."""
    manifests = kustomize(directory)
    checked = 0
    for workload in manifests:
        if workload["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        pod = workload["spec"]["template"]["spec"]
        exporters = [
            c
            for c in pod.get("initContainers", []) + pod["containers"]
            if c["image"].startswith(EXPORTER_IMAGE)
        ]
        for exporter in exporters:
            checked += 1
            name = workload["metadata"]["name"]
            watched = (exporter_config_of(manifests, pod).get("ingestions") or {}).get("directory")
            shared = written_directories(pod, exporter)
            if shared:
                assert watched in shared, (
                    f"{name}: the app writes to {sorted(shared)}, the exporter watches {watched!r}"
                )
            elif watched:
                mounts = {m["mountPath"] for m in exporter.get("volumeMounts", [])}
                assert watched in mounts, f"{name}: {watched!r} is not mounted"
    assert checked, f"no exporter in {directory}"


def test_the_user_apps_exporter_watches_the_directory_its_app_writes_to(
    user_app: list[Manifest],
) -> None:
    """In the docs' app, started from the component's config as the docs say, the exporter of
    the workload that writes upload files watches that directory."""
    (workload,) = [m for m in user_app if m["metadata"]["name"] == "checkout-feed"]
    pod = workload["spec"]["template"]["spec"]
    (exporter,) = [c for c in pod["initContainers"] if c["image"].startswith(EXPORTER_IMAGE)]
    watched = exporter_config_of(user_app, pod)["ingestions"]["directory"]
    assert written_directories(pod, exporter) == {watched}
