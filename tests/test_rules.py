"""Alert rules: valid for promtool, unit-tested for every alert, documented in the README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_tool

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
    "CatalogExporterStale",
    "CatalogExporterConfigReloadFailed",
}


def alerts() -> list[dict[str, object]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    """`promtool check rules` finds every rule valid."""
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


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
    for name, rule in defined.items():
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
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {str(rule["alert"]) for rule in alerts()}
    assert names - firing == set()
    assert names - silent == set()


def test_every_runbook_url_points_at_a_readme_section() -> None:
    """runbook_url anchors resolve to headings in the README."""
    readme = (ROOT / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)
    }
    for rule in alerts():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        url = str(annotations["runbook_url"])
        assert url.split("#", 1)[1] in anchors, url
