"""Alert and recording rules: valid for promtool, unit-tested, alerts documented in docs/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.test_docs import heading_anchors

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "catalog-upload-exporter.rules.yml"
RULE_TESTS = sorted((ROOT / "tests" / "rules").glob("*.test.yml"))
REQUIRED_ALERTS = {
    "CatalogUploadFatal",
    "CatalogUploadCancelled",
    "CatalogUploadStuck",
    "CatalogUploadInvalidId",
    "CatalogApiThrottled",
    "CatalogApiErrors",
    "CatalogExporterDown",
    "CatalogExporterIdle",
    "CatalogExporterStale",
    "CatalogExporterConfigReloadFailed",
    "CatalogExporterPollLagging",
    "CatalogExporterEventLoopLagging",
    "CatalogExporterNotificationQueueFailing",
    "CatalogUploadSuccessBudgetBurn",
    "CatalogExporterConfigInvalid",
}
#: Recording rule names follow the Prometheus convention `level:metric:operations`.
RECORD_NAME = re.compile(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+")
#: A burn-rate threshold in the SLO alerts: `(<burn rate> * <error budget>)`.
BURN_THRESHOLD = re.compile(r"\((\d+(?:\.\d+)?) \* (0\.\d+)\)")


def rules() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, object]]:
    return [rule for rule in rules() if "alert" in rule]


def recording_rules() -> list[dict[str, object]]:
    return [rule for rule in rules() if "record" in rule]


def slo_error_budget() -> str:
    """The error budget (1 - objective) of the upload success SLO, as written in the rules.

    It appears in every burn-rate threshold; they must all agree.
    """
    budgets = {
        budget for rule in alerts() for _, budget in BURN_THRESHOLD.findall(str(rule["expr"]))
    }
    assert len(budgets) == 1, f"the burn-rate alerts disagree on the error budget: {budgets}"
    return budgets.pop()


def unit_tests() -> list[dict[str, Any]]:
    """Every test case of every promtool unit-test file."""
    return [case for path in RULE_TESTS for case in yaml.safe_load(path.read_text())["tests"]]


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    """`promtool check rules` finds every rule valid."""
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@pytest.mark.slow
def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes on every unit-test file."""
    assert RULE_TESTS
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_required_alert_exists_with_severity_and_annotations() -> None:
    """Each alert the issue asks for is defined with severity, summary, description, runbook."""
    defined = {str(rule["alert"]): rule for rule in alerts()}
    assert defined.keys() >= REQUIRED_ALERTS
    for rule in alerts():  # every rule: an alert may have one rule per severity
        name = rule["alert"]
        labels = rule.get("labels")
        annotations = rule.get("annotations")
        assert isinstance(labels, dict) and labels.get("severity") in {"page", "warning"}, name
        assert isinstance(annotations, dict), name
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), name
    assert defined["CatalogUploadFatal"]["labels"] == {"severity": "page"}


def test_every_alert_has_a_firing_and_a_not_firing_unit_test() -> None:
    """The promtool tests check each alert both ways."""
    firing: set[str] = set()
    silent: set[str] = set()
    for case in unit_tests():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alerts()}
    assert names - firing == set()
    assert names - silent == set()


def test_every_alert_has_its_own_runbook_heading_in_docs_alerts() -> None:
    """Each alert's runbook_url ends in docs/alerts.md#<alert name, lower case>, a heading there."""
    anchors = heading_anchors(ROOT / "docs" / "alerts.md")
    for rule in alerts():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        url = str(annotations["runbook_url"])
        assert url.endswith(f"/docs/alerts.md#{str(rule['alert']).lower()}"), url
        assert url.split("#", 1)[1] in anchors, url


def test_every_recording_rule_is_named_by_convention_and_unit_tested() -> None:
    """Each `record:` is `level:metric:operations` and has a promql_expr_test with samples.

    A test with expected samples pins its values; tests that expect no series (the guards
    against dividing by zero) come in addition.
    """
    names = {str(rule["record"]) for rule in recording_rules()}
    assert names
    assert {name for name in names if not RECORD_NAME.fullmatch(name)} == set()
    tested: set[str] = set()
    for case in unit_tests():
        for check in case.get("promql_expr_test", []):
            if check.get("exp_samples"):
                used = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", check["expr"]))
                tested |= names & used
    assert names - tested == set()


def test_the_budget_burn_alert_pages_fast_and_tickets_slow_on_one_objective() -> None:
    """Page at 14.4 times the error budget over 1h/5m, ticket at 6 times over 6h/30m, both on
    the same budget, each needing enough finished uploads in its long window."""
    burn: dict[str, str] = {}
    for rule in alerts():
        if rule["alert"] == "CatalogUploadSuccessBudgetBurn":
            labels = rule["labels"]
            assert isinstance(labels, dict)
            burn[labels["severity"]] = " ".join(str(rule["expr"]).split())
    assert burn.keys() == {"page", "warning"}
    budget = slo_error_budget()
    windows = {"page": ("14.4", "1h", "5m"), "warning": ("6", "6h", "30m")}
    for severity, (rate, long, short) in windows.items():
        expr, threshold = burn[severity], f"({rate} * {budget})"
        assert f"namespace_job:catalog_upload_failure:ratio_rate{long} > {threshold}" in expr
        assert f"namespace_job:catalog_upload_duration_seconds_count:increase{long} >= 5" in expr
        assert (
            f"unless namespace_job:catalog_upload_failure:ratio_rate{short} <= {threshold}" in expr
        )


#: A grouping or matching clause: `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`.
CLAUSE = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")


def test_every_rule_that_keeps_job_keeps_namespace_too() -> None:
    """Each `by (...)` or `on (...)` clause naming `job` names `namespace` as well, and none
    drops them with `without`/`ignoring`: applications that share a job (one namespace each)
    never merge into one alert or SLO."""
    checked = 0
    for rule in rules():
        expr = str(rule["expr"])
        for keyword, labels in CLAUSE.findall(expr):
            names = {name.strip() for name in labels.split(",") if name.strip()}
            assert keyword in {"by", "on"}, f"{keyword} ({labels}) in {rule}"
            if "job" in names:
                checked += 1
                assert "namespace" in names, f"{keyword} ({labels}) without namespace: {expr}"
    assert checked >= 20


def test_the_idle_alert_waits_a_day_per_application() -> None:
    """CatalogExporterIdle is a warning that needs a whole day of nothing tracked, per
    namespace and job (docs/alerts.md says why it is on, and how to lengthen it)."""
    (idle,) = [rule for rule in alerts() if rule["alert"] == "CatalogExporterIdle"]
    assert idle["labels"] == {"severity": "warning"}
    assert idle["for"] == "1d"
    assert "max by (namespace, job) (catalog_exporter_tracked_ingestions" in str(idle["expr"])
