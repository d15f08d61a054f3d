"""Property tests: whatever comes in, a classified outcome or a clear error, never a crash."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import ConfigError, load_config, parse_config
from exporter.exposition import UploadExposition
from exporter.models import PollError, StatusReport, ingestion_id_problem
from exporter.responses import classify_response
from exporter.uploads import UploadStore
from tests.scrape_body import scrape_body

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
CODES = st.sampled_from([200, 200, 200, 400, 401, 403, 404, 418, 429, 500, 502, 503])


@given(code=CODES, body=st.binary(max_size=2048), retry_after=st.none() | st.text(max_size=40))
def test_any_bytes_give_a_status_or_a_classified_error(
    code: int, body: bytes, retry_after: str | None
) -> None:
    """classify_response never raises, whatever the body and headers."""
    headers = CIMultiDict({"Retry-After": retry_after} if retry_after is not None else {})
    outcome = classify_response(code, body, headers)
    assert isinstance(outcome, StatusReport | PollError)
    if isinstance(outcome, PollError):
        assert "\n" not in outcome.message and len(outcome.message) <= 200


@given(document=JSON)
def test_any_json_200_gives_a_status_or_malformed(document: object) -> None:
    """A 200 with any JSON is a StatusReport with a label-safe status, or malformed_response."""
    outcome = classify_response(200, json.dumps(document).encode(), CIMultiDict())
    if isinstance(outcome, StatusReport):
        assert outcome.status.isupper() or outcome.status == "UNKNOWN"
        assert all(c.isalnum() or c == "_" for c in outcome.status)
    else:
        assert outcome.kind == "malformed_response"


@given(document=JSON)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_document_gives_a_config_or_a_config_error(document: object) -> None:
    """parse_config never raises anything but ConfigError, and each problem names a key."""
    problems: tuple[str, ...] = ()
    try:
        parse_config(document, environ={"AWS_REGION": "us-east-1"}, hostname="h-0")
    except ConfigError as error:
        problems = error.problems or ("(no problem listed)",)
    assert all(":" in problem for problem in problems)


#: Text that is often YAML-ish: keys of the config, YAML punctuation, and anything at all.
YAML_TEXT = st.lists(
    st.sampled_from(
        ["api:", "base_url:", "polling:", "ingestions:", "ids:", "- ", "  ", "\n", ": ", "{", "}",
         "[", "]", "&a ", "*a", "!!python/object ", "'", '"', "#", "---", "...", "1e9", "null",
         "http://x", "\t", "%YAML 1.2", "<<: "]
    )
    | st.text(max_size=8),
    max_size=40,
).map("".join)  # fmt: skip


@given(text=YAML_TEXT)
@settings(max_examples=200, deadline=None)
def test_any_yaml_text_gives_a_config_or_a_config_error_naming_where(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """load_config reads any file content into a Config or a ConfigError, nothing else."""
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    problems: tuple[str, ...] = ()
    try:
        load_config(path, environ={"AWS_REGION": "us-east-1"}, hostname="h-0")
    except ConfigError as error:
        problems = error.problems or ("(no problem listed)",)
    assert all(":" in problem for problem in problems)


@pytest.mark.slow
@given(ids=st.lists(st.text(max_size=300), min_size=1, max_size=8, unique=True))
@settings(max_examples=60, deadline=None)
def test_any_accepted_ids_give_an_exposition_both_parsers_and_promtool_accept(
    ids: list[str],
) -> None:
    """Ids that pass validation, however odd (quotes, backslashes, unicode), keep /metrics valid."""
    store = UploadStore()
    exposition = UploadExposition(store, label_names=lambda: (), active_status_only=lambda: False)
    accepted = [i for i in ids if ingestion_id_problem(i) is None]
    for ingestion_id in accepted:
        store.add(ingestion_id, "api", {})
    body = scrape_body(exposition, CollectorRegistry(), openmetrics=False)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    seen = {s.labels["ingestion_id"] for s in families["catalog_upload_status"].samples}
    assert seen == set(accepted)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required: `make test` installs Debian's prometheus package"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
