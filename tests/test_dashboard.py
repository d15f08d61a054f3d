"""The Grafana dashboard: importable anywhere, PromQL that promtool accepts, names we export.

The dashboard is public API's first consumer: a renamed metric or label must break this file
before it breaks someone's wall screen. PromQL is checked by the real promtool, which is
required: a missing one fails the suite rather than skipping it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession

from exporter.models import KNOWN_STATUSES, TERMINAL_STATUSES
from exporter.simulator import UPLOAD_PATHS, Fault
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, require_tool, wait_for
from tests.test_rules import slo_error_budget

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "catalog-upload-exporter.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Concrete stand-ins for every Grafana variable the dashboard may use in a query.
VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "job": ".*",
    "namespace": ".*",
    "pod": ".*",
    "instance": ".*",
    "stuck_after": "7200",
}
#: `$name`, `${name}`, `${name:format}` and the deprecated `[[name]]`.
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")

#: Series Prometheus makes itself rather than scraping them from the exporter.
PROMETHEUS_OWN_SERIES = {"up"}
PROMETHEUS_TARGET_LABELS = {"job", "instance", "namespace", "pod"}

#: What an operator needs to see, by the metric that shows it.
REQUIRED_METRICS = {
    "catalog_uploads",
    "catalog_upload_status",
    "catalog_upload_status_changed_timestamp_seconds",
    "catalog_api_requests_total",
    "catalog_api_throttled_total",
    "catalog_api_errors_total",
    "catalog_api_request_duration_seconds_bucket",
    "catalog_api_rate_limit_requests_per_second",
    "catalog_exporter_last_successful_poll_timestamp_seconds",
    "catalog_exporter_config_last_reload_successful",
    "catalog_exporter_tracked_ingestions",
    "catalog_exporter_build_info",
    "catalog_upload_duration_seconds_bucket",
    "catalog_upload_duration_seconds_count",
    "catalog_upload_queue_seconds_bucket",
    "catalog_exporter_rejected_ingestions_total",
    "catalog_exporter_event_loop_lag_seconds_bucket",
    "process_resident_memory_bytes",
    "catalog_exporter_notifications_total",
    "catalog_exporter_notification_errors_total",
    "catalog_exporter_notification_poll_delay_seconds_bucket",
    "catalog_exporter_proxy_requests_total",
    "up",
}

#: Panels that show the upload success SLO over the fixed windows of its recording rules and
#: alerts (every other query uses $__rate_interval), with those windows.
SLO_PANEL_WINDOWS = {
    "Upload success ratio": {"1h", "1d"},
    "Error-budget burn rate": {"1h", "6h"},
}
#: The promtool unit tests of the SLO recording rules, whose input series and expected values
#: the SLO panels are checked against.
SLO_RULE_TESTS = Path(__file__).parent / "rules" / "catalog-upload-exporter.slo.test.yml"

PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SELECTOR = re.compile(r"\b(catalog_[a-z0-9_]+|up)\b\s*(\{[^}]*\})?")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows; rows themselves left out."""
    found = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]


def variable_queries(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str) -> str:
    """The expression with each Grafana variable replaced by a value Prometheus accepts."""

    def concrete(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in VARIABLES:
            pytest.fail(f"no stand-in for Grafana variable {name!r}; add one to VARIABLES")
        return VARIABLES[name]

    return VARIABLE.sub(concrete, expr)


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects: identifiers that are not functions or keywords."""
    bare = STRING.sub('""', substitute(expr))
    bare = GROUPING.sub(" ", bare)
    bare = MATCHERS.sub(" ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    names: set[str] = set()
    for match in IDENTIFIER.finditer(bare):
        is_call = re.match(r"\s*\(", bare[match.end() :]) is not None
        if not is_call and match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression matches on or groups by."""
    bare = STRING.sub('""', expr)
    names: set[str] = set()
    for grouping in GROUPING.finditer(bare):
        names.update(n.strip() for n in grouping.group(1).split(",") if n.strip())
    for matchers in MATCHERS.finditer(bare):
        names.update(MATCHER_LABEL.findall(matchers.group(1)))
    return names


def walk(node: Any, path: str = "$") -> Iterator[tuple[str, str, Any]]:
    """Every (path, key, value) pair in a JSON document."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield path, key, child
            yield from walk(child, f"{path}.{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from walk(child, f"{path}[{index}]")


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def panel_titled(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    matching = [p for p in panels(dashboard) if p["title"] == title]
    assert len(matching) == 1, f"expected one panel titled {title!r}"
    return matching[0]


def test_the_dashboard_imports_without_clashing() -> None:
    """The JSON loads with a fixed uid, title and tag, no id and no __inputs to fill in."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == "catalog-upload-exporter"
    assert dashboard["title"] == "Catalog uploads"
    assert "catalog-upload-exporter" in dashboard["tags"]
    assert dashboard.get("id") is None
    assert "__inputs" not in dashboard
    assert 36 <= dashboard["schemaVersion"] <= 41


def test_every_panel_target_and_variable_queries_the_datasource_variable() -> None:
    """Panels, their targets and query variables all use `${datasource}`, never a fixed one."""
    dashboard = load_dashboard()
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
    for variable in variable_queries(dashboard):
        assert variable["datasource"] == DATASOURCE, variable["name"]


def test_no_uid_is_hard_coded_anywhere() -> None:
    """The only uid that is not `${datasource}` is the dashboard's own."""
    dashboard = load_dashboard()
    for path, key, value in walk(dashboard):
        if key == "uid" and path != "$":
            assert value == "${datasource}", f"{path}.uid is {value!r}"
        if key == "datasource":
            assert isinstance(value, dict), f"{path}.datasource names a datasource: {value!r}"


def test_variables_pick_datasource_job_namespace_pod_instance_and_stuck_threshold() -> None:
    """A Prometheus datasource variable, job, then multi-select namespace, pod and instance,
    each narrowed by the ones before it, and stuck after 2 h."""
    template = load_dashboard()["templating"]["list"]
    variables = {v["name"]: v for v in template}
    assert [v["name"] for v in template][:5] == [
        "datasource",
        "job",
        "namespace",
        "pod",
        "instance",
    ]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["definition"] == "label_values(catalog_exporter_build_info, job)"
    narrowing = {
        "namespace": 'label_values(catalog_exporter_build_info{job=~"$job"}, namespace)',
        "pod": "label_values(catalog_exporter_build_info"
        '{job=~"$job", namespace=~"$namespace"}, pod)',
        "instance": "label_values(catalog_exporter_build_info"
        '{job=~"$job", namespace=~"$namespace", pod=~"$pod"}, instance)',
    }
    for name, definition in narrowing.items():
        variable = variables[name]
        assert variable["definition"] == definition == variable["query"]["query"], name
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*", name
    assert variables["stuck_after"]["current"]["value"] == "7200"


def test_every_series_is_selected_by_job_namespace_pod_and_instance() -> None:
    """Each metric in each query carries `job=~"$job", namespace=~"$namespace", pod=~"$pod",
    instance=~"$instance"`, and every clause that keeps `job` keeps `namespace` too: apps
    sharing a job (one namespace each) are never summed together."""
    wanted = ('job=~"$job"', 'namespace=~"$namespace"', 'pod=~"$pod"', 'instance=~"$instance"')
    for expr in expressions(load_dashboard()):
        for selector in SELECTOR.finditer(expr):
            matchers = selector.group(2) or ""
            assert all(w in matchers for w in wanted), (
                f"{selector.group(1)} without the job/namespace/pod/instance selector in:\n{expr}"
            )
        for grouping in GROUPING.finditer(expr):
            names = {n.strip() for n in grouping.group(1).split(",")}
            assert "job" not in names or "namespace" in names, f"{grouping.group()} in {expr}"


def test_the_report_hint_names_the_uploads_namespace_and_pod() -> None:
    """In the attention table the id's link shows `kubectl exec -n <namespace> <pod>` from
    the row's own labels, whose columns are shown rather than hidden."""
    table = panel_titled(load_dashboard(), "Uploads needing attention")
    (override,) = [
        o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Ingestion id"
    ]
    (links,) = [p["value"] for p in override["properties"] if p["id"] == "links"]
    (link,) = links
    assert link["title"].startswith(
        "Processing report: kubectl exec -n ${__data.fields.namespace} ${__data.fields.pod} "
        "-c catalog-upload-exporter -- catalog-upload-exporter report '${__value.raw}'"
    )
    organize = table["transformations"][0]["options"]
    assert {"namespace", "pod"} <= organize["indexByName"].keys()
    assert not {"namespace", "pod"} & {k for k, v in organize["excludeByName"].items() if v}


def test_every_panel_has_a_unique_id_a_position_and_a_description() -> None:
    """Ids are unique; each panel sits on the 24-column grid, overlaps none, says what it shows."""
    all_panels = panels(load_dashboard())
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels:
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= grid.keys(), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel.get("description"), panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                overlapped = cells.setdefault((x, y), panel["title"])
                assert overlapped == panel["title"], f"{panel['title']} covers {overlapped}"


def test_panels_cover_uploads_api_and_exporter_health() -> None:
    """Status, attention, age, requests, throttling, errors, latency, rate and health shown."""
    dashboard = load_dashboard()
    exprs = expressions(dashboard)
    used = set().union(*(metric_names(e) for e in exprs))
    assert used >= REQUIRED_METRICS, REQUIRED_METRICS - used
    joined = "\n".join(exprs)
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, " in joined
    assert "time() - catalog_upload_status_changed_timestamp_seconds" in joined
    assert "$stuck_after" in joined
    for panel in panels(dashboard):
        windows = {w for t in panel["targets"] for w in re.findall(r"\[([^\]]+)\]", t["expr"])}
        allowed = SLO_PANEL_WINDOWS.get(panel["title"], {"$__rate_interval"})
        assert windows <= allowed, (panel["title"], windows - allowed)
    assert "$__rate_interval" in joined
    table = panel_titled(dashboard, "Uploads needing attention")
    assert table["type"] == "table" and table["transformations"]
    assert all(t["instant"] and t["format"] == "table" for t in table["targets"])
    stacked = panel_titled(dashboard, "Uploads by status")
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"


def test_every_expression_passes_promtool_check_rules(tmp_path: Path) -> None:
    """Each query, variables filled in, is a valid recording rule for `promtool check rules`."""
    exprs = expressions(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{n}", "expr": substitute(expr)}
                    for n, expr in enumerate(exprs)
                ],
            }
        ]
    }
    rules_file = tmp_path / "dashboard.rules.yml"
    rules_file.write_text(json.dumps(rules, indent=2))  # JSON is YAML, quoting included
    run_promtool("check", "rules", str(rules_file))


def test_slo_panels_show_what_the_recording_rules_record(tmp_path: Path) -> None:
    """The success-ratio and burn-rate panels compute what the SLO recording rules record.

    Run by `promtool test rules` on the input series of the rules' own unit test (all jobs and
    instances selected), each panel query must give the values that test expects of the
    recording rule for its window, divided by the error budget for burn rates. The dashed
    threshold lines are the objective (1 - the rules' error budget) and the alerts' burn rates.
    """
    dashboard = load_dashboard()
    budget = float(slo_error_budget())
    case = next(
        c
        for c in yaml.safe_load(SLO_RULE_TESTS.read_text())["tests"]
        if c["name"] == "slo ratios and finished uploads"
    )
    recorded = {
        (check["expr"], check["eval_time"]): check["exp_samples"]
        for check in case["promql_expr_test"]
        if check["exp_samples"]
    }
    checks = []
    for title, kind, scale in (
        ("Upload success ratio", "success", 1.0),
        ("Error-budget burn rate", "failure", budget),
    ):
        for target in panel_titled(dashboard, title)["targets"]:
            (window,) = set(re.findall(r"\[([^\]]+)\]", target["expr"]))
            eval_time = "24h"
            expected = recorded[
                (f"namespace_job:catalog_upload_{kind}:ratio_rate{window}", eval_time)
            ]
            checks.append(
                {
                    "expr": substitute(target["expr"]),
                    "eval_time": eval_time,
                    "exp_samples": [
                        {
                            "labels": s["labels"][s["labels"].index("{") :],
                            "value": s["value"] / scale,
                        }
                        for s in expected
                    ],
                }
            )
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": case["interval"],
                "input_series": case["input_series"],
                "promql_expr_test": checks,
            }
        ],
    }
    tests_file = tmp_path / "slo-panels.test.yml"
    tests_file.write_text(json.dumps(tests, indent=2))
    run_promtool("test", "rules", str(tests_file))

    def dashed_thresholds(title: str) -> list[float]:
        defaults = panel_titled(dashboard, title)["fieldConfig"]["defaults"]
        assert defaults["custom"]["thresholdsStyle"]["mode"] == "dashed", title
        return [step["value"] for step in defaults["thresholds"]["steps"][1:]]

    assert dashed_thresholds("Upload success ratio") == [pytest.approx(1 - budget)]
    assert dashed_thresholds("Error-budget burn rate") == [6, 14.4]


#: Labels Prometheus adds to every series of one exporter in the PromQL unit tests.
TARGET = 'job="catalog", instance="sidecar:10184"'
#: When the PromQL unit tests evaluate: 3 h after the input series start.
EVAL_SECONDS = 3 * 3600
#: ingestion_id: (its hot status, when the exporter saw that status begin, seconds from 0).
UPLOADS = {
    "failed": ("FATAL", 9000),
    "cancelled": ("CANCELLED", 0),
    "nosuch": ("INVALID", 3600),
    "stuck": ("INPROGRESS", 0),
    "unread": ("UNKNOWN", 0),
    "fresh": ("INQUEUE", 10200),
    "finished": ("DONE", 0),
}


def upload_series() -> list[dict[str, str]]:
    """promtool input series: each upload's one-hot status and its status-change timestamp."""
    series = []
    for ingestion_id, (hot, changed) in UPLOADS.items():
        ids = f'{TARGET}, ingestion_id="{ingestion_id}"'
        for status in KNOWN_STATUSES:
            one_hot = "1" if status == hot else "0"
            series.append(
                {
                    "series": f'catalog_upload_status{{{ids}, status="{status}"}}',
                    "values": f"{one_hot}+0x200",
                }
            )
        series.append(
            {
                "series": f"catalog_upload_status_changed_timestamp_seconds{{{ids}}}",
                "values": f"{changed}+0x200",
            }
        )
    return series


def assert_lists_uploads_with_age(tmp_path: Path, panel_title: str, listed: set[str]) -> None:
    """The panel's first query, run by `promtool test rules`, gives exactly `listed` uploads.

    Each result must keep the upload's status label and have its age in status as value.
    """
    expr = panel_titled(load_dashboard(), panel_title)["targets"][0]["expr"]
    expected = [
        {
            "labels": f'{{{TARGET}, ingestion_id="{i}", status="{UPLOADS[i][0]}"}}',
            "value": EVAL_SECONDS - UPLOADS[i][1],
        }
        for i in sorted(listed)
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": upload_series(),
                "promql_expr_test": [
                    {
                        "expr": substitute(expr),
                        "eval_time": f"{EVAL_SECONDS}s",
                        "exp_samples": expected,
                    }
                ],
            }
        ],
    }
    tests_file = tmp_path / "panel.test.yml"
    tests_file.write_text(json.dumps(tests, indent=2))
    run_promtool("test", "rules", str(tests_file))


def test_attention_table_lists_failed_invalid_and_stuck_uploads_only(tmp_path: Path) -> None:
    """FATAL, CANCELLED, INVALID and unfinished-for-over-2-h uploads are listed with their age."""
    listed = {"failed", "cancelled", "nosuch", "stuck", "unread"}
    assert_lists_uploads_with_age(tmp_path, "Uploads needing attention", listed)


def test_in_flight_age_shows_every_unfinished_upload_and_nothing_else(tmp_path: Path) -> None:
    """INQUEUE, INPROGRESS and UNKNOWN uploads are shown, fresh or not; finished ones are not."""
    listed = {"stuck", "unread", "fresh"}
    assert_lists_uploads_with_age(tmp_path, "In-flight upload age", listed)


def test_status_values_the_dashboard_matches_are_statuses_the_exporter_knows() -> None:
    """Every value in a `status=~"A|B"` matcher is one of the exporter's known statuses."""
    joined = "\n".join(expressions(load_dashboard()))
    values = re.findall(r'\bstatus\s*(?:=~|!~|=|!=)\s*"([^"]*)"', joined)
    assert values
    for value in values:
        assert set(value.split("|")) <= set(KNOWN_STATUSES), value
    final = re.findall(r'\bfinal_status\s*(?:=~|!~|=|!=)\s*"([^"]*)"', joined)
    assert final
    for value in final:
        assert set(value.split("|")) <= set(TERMINAL_STATUSES), value


async def test_every_metric_and_label_the_dashboard_uses_is_exported(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A live scrape with every status, a 429, errors and latencies has each name used."""
    sim, url = await start_simulator()
    sim.add_upload("finished", [("DONE", 0)])
    sim.add_upload("failed", [("FATAL", 0)])
    sim.add_upload("cancelled", [("CANCELLED", 0)])
    sim.add_upload("queued", [("INQUEUE", 0)])
    sim.add_upload("running", [("INPROGRESS", 0)])
    sim.inject(Fault("throttle"), ingestion_id="running", count=2)
    sim.inject(Fault("server_error_json"), ingestion_id="queued", count=1)
    ids = ["finished", "failed", "cancelled", "queued", "running", "nosuch"]
    config = fast_config(url, ids, proxy={"enabled": True, "port": 0})
    running = await start_exporter(config)
    assert running.proxy_url is not None
    async with ClientSession() as session:
        upload = await session.post(running.proxy_url + UPLOAD_PATHS[0], data=b"{}")
        assert upload.status == 200  # the app's side of the budget has a series too

    async def every_kind_of_series_seen() -> bool:
        samples = await running.scrape()
        throttled = samples.get(("catalog_api_throttled_total", frozenset()), 0.0)
        invalid = samples.get(
            ("catalog_uploads", frozenset({("status", "INVALID")})),
            0.0,
        )
        errors = samples.get(
            ("catalog_api_errors_total", frozenset({("kind", "server_error")})), 0.0
        )
        return throttled >= 2 and invalid == 1 and errors >= 1

    await wait_for(every_kind_of_series_seen)
    samples = await running.scrape()
    exported = {name for name, _ in samples} | PROMETHEUS_OWN_SERIES
    exported_labels = {label for _, labels in samples for label, _ in labels}
    dashboard = load_dashboard()
    exprs = expressions(dashboard)
    used = set().union(*(metric_names(e) for e in exprs))
    for variable in variable_queries(dashboard):
        used.update(re.findall(r"catalog_[a-z0-9_]+", variable["definition"]))
    missing_names = used - exported
    assert missing_names == set(), f"used by the dashboard, not exported: {missing_names}"

    labels = set().union(*(label_names(e) for e in exprs))
    missing = labels - exported_labels - PROMETHEUS_TARGET_LABELS
    assert missing == set(), f"labels the dashboard uses, not exported: {missing}"
