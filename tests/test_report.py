"""Processing reports on demand: the `report` command and the admin API's report route,
end to end over loopback HTTP against the simulator, which serves presigned report links and
records every request made to its report endpoint (with the credential headers it carried)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from subprocess import PIPE
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from botocore.credentials import Credentials

from exporter import report_command
from exporter.admin import create_admin_app
from exporter.auth import RequestAuth, SigV4Auth
from exporter.config import AuthConfig
from exporter.demo import REPORT_EXAMPLE_ID, report_example, write_report_config
from exporter.report import DownloadLimits, ReportFailure, ReportFetched, ReportProblem, download
from exporter.simulator import (
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    Fault,
    FaultKind,
    Simulator,
    demo_uploads,
)
from exporter.tracking import Source
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for
from tests.test_admin import Sent, off_schema, recorder, undocumented

TOKEN = "bearer-token-SECRET-0123456789"
SESSION_TOKEN = "FQoGZXIvYXdzEXAMPLESESSIONTOKENSECRET"
#: What a presigned link's signature looks like: 64 hex digits (also the simulator's).
HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class TickingClock:
    """A wall clock that moves `step` seconds each time it is read: a link signed at one
    read is checked at the next, `step` seconds later."""

    def __init__(self, step: float) -> None:
        self.now = 1_718_000_000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


#: The simulator's report bucket is on loopback, over plain http: listed, or never fetched.
SIMULATOR_HOSTS = ["127.0.0.1"]


def write_config(tmp_path: Path, base_url: str, **api: Any) -> Path:
    """A config file for the `report` command: the simulator's URL (its host listed in
    api.report_hosts), `api` merged in."""
    document = {
        "api": {
            "base_url": base_url,
            "auth": {"type": "none"},
            "timeout_seconds": 5,
            "report_hosts": SIMULATOR_HOSTS,
            **api,
        },
        "ingestions": {"ids": []},
        "logging": {"level": "debug"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class Run:
    """One run of the `report` command: exit code, stdout bytes, stderr text."""

    def __init__(self, code: int, stdout: bytes, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr


async def run_report(
    *args: str,
    auth: Callable[[AuthConfig], RequestAuth] | None = None,
    slept: list[float] | None = None,
) -> Run:
    """Run the command in a thread (it has its own event loop) while the simulator serves;
    its pauses between retries are recorded in `slept` instead of slept."""
    out, err = io.BytesIO(), io.StringIO()
    pauses = [] if slept is None else slept

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    extra: dict[str, Any] = {"sleep": sleep}
    if auth is not None:
        extra["auth_factory"] = auth
    code = await asyncio.to_thread(report_command.main, list(args), stdout=out, stderr=err, **extra)
    return Run(code, out.getvalue(), err.getvalue())


def assert_no_link(text: str | bytes) -> None:
    """Nothing of a presigned link: no X-Amz query parameter, no signature-like hex."""
    shown = text.decode(errors="replace") if isinstance(text, bytes) else text
    assert "X-Amz-" not in shown
    assert "/reports/" not in shown
    assert not HEX_SIGNATURE.search(shown), shown


# -- the command ----------------------------------------------------------------------------------


async def test_report_command_writes_the_fresh_report_to_stdout(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """A FATAL upload's report goes to stdout in full, exit 0, after one status poll."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1")
    assert run.code == 0, run.stderr
    assert run.stdout == sim.reports.body("up-1")
    assert sim.count(ingestion_id="up-1") == 1
    assert [r.outcome for r in sim.reports.requests] == ["served"]
    assert "from 127.0.0.1" in run.stderr


async def test_report_command_writes_path_atomically_and_leaves_no_temporary_file(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """-o PATH holds the whole report; no temporary file is left beside it."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("CANCELLED", math.inf)])
    out = tmp_path / "out" / "report.csv"
    out.parent.mkdir()
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1", "-o", str(out))
    assert run.code == 0, run.stderr
    assert out.read_bytes() == sim.reports.body("up-1")
    assert [p.name for p in out.parent.iterdir()] == ["report.csv"]
    assert run.stdout == b""


@pytest.mark.parametrize(
    ("status", "report"), [("INPROGRESS", True), ("INQUEUE", True), ("FATAL", False)]
)
async def test_no_report_yet_exits_1_naming_the_status(
    start_simulator: SimulatorFactory, tmp_path: Path, status: str, report: bool
) -> None:
    """A running upload, or a terminal one with an empty link, is exit 1 naming the status."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [(status, math.inf)], report=report)
    out = tmp_path / "report.csv"
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1", "-o", str(out))
    assert run.code == 1
    assert f"status is {status}" in run.stderr
    assert not out.exists()
    assert sim.reports.requests == []


async def test_an_expired_link_is_a_download_failure_exit_3(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """A link that expired before the download is refused by the report host: exit 3, the
    message names the kind (http_403) and S3's reason, and no file is written."""
    sim, url = await start_simulator(wall_clock=TickingClock(3601.0))
    sim.add_upload("up-1", [("FATAL", math.inf)])
    out = tmp_path / "report.csv"
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1", "-o", str(out))
    assert run.code == 3
    assert "download failed (http_403)" in run.stderr
    assert "Request has expired" in run.stderr
    assert [r.outcome for r in sim.reports.requests] == ["expired"]
    assert not out.exists()
    assert list(tmp_path.glob("*.part")) == []
    assert_no_link(run.stderr)


async def test_the_simulator_refuses_an_expired_or_tampered_link(
    start_simulator: SimulatorFactory,
) -> None:
    """The simulator's links really expire and really are checked: the tests above can fail."""
    clock = TickingClock(0.0)
    sim, url = await start_simulator(wall_clock=clock, report_link_seconds=60)
    sim.add_upload("up-1", [("FATAL", math.inf)])
    link = sim.current("up-1", url)[1]
    async with aiohttp.ClientSession() as session:
        tampered = link.replace("/up-1.csv", "/up-2.csv")
        statuses = []
        for target in (link, tampered):
            async with session.get(aiohttp.client.URL(target, encoded=True)) as response:
                statuses.append(response.status)
        clock.now += 61
        async with session.get(aiohttp.client.URL(link, encoded=True)) as response:
            statuses.append(response.status)
    assert statuses == [200, 403, 403]
    assert [r.outcome for r in sim.reports.requests] == ["served", "bad_signature", "expired"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_report_over_max_report_bytes_exits_4_and_writes_nothing(
    start_simulator: SimulatorFactory, tmp_path: Path, chunked: bool
) -> None:
    """Over api.max_report_bytes, announced or only counted while streaming: exit 4, no file,
    nothing on stdout."""
    sim, url = await start_simulator(report_bytes=8192, report_chunked=chunked)
    sim.add_upload("up-1", [("FATAL", math.inf)])
    config = str(write_config(tmp_path, url, max_report_bytes=1024))
    out = tmp_path / "report.csv"
    to_file = await run_report("--config", config, "up-1", "-o", str(out))
    to_stdout = await run_report("--config", config, "up-1")
    for run in (to_file, to_stdout):
        assert run.code == 4, run.stderr
        assert "more than api.max_report_bytes (1024)" in run.stderr
        assert_no_link(run.stderr)
    assert "announced" in to_file.stderr if not chunked else "sent more" in to_file.stderr
    assert to_stdout.stdout == b""
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


async def test_a_redirect_from_the_report_host_is_not_followed(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """A 302 from the report host is a download failure (exit 3, kind redirect); the host
    it points at receives nothing."""
    sim, url = await start_simulator()
    elsewhere, elsewhere_url = await start_simulator()
    elsewhere.add_upload("up-1", [("FATAL", math.inf)])
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.reports.redirect_to = elsewhere.current("up-1", elsewhere_url)[1]
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1")
    assert run.code == 3
    assert "download failed (redirect)" in run.stderr
    assert [r.outcome for r in sim.reports.requests] == ["redirected"]
    assert elsewhere.reports.requests == []
    assert_no_link(run.stderr)


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (Fault(FaultKind.SERVER_ERROR_JSON), "server_error"),
        (Fault(FaultKind.UNAUTHORIZED), "unauthorized"),
    ],
)
async def test_an_api_failure_exits_3_naming_the_kind(
    start_simulator: SimulatorFactory, tmp_path: Path, fault: Fault, kind: str
) -> None:
    """getCatalogUploadStatus failing is exit 3 with the API error kind in the message, after
    3 retries for a passing fault (a server error) and none for a lasting one (403)."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.inject(fault)
    slept: list[float] = []
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1", slept=slept)
    assert run.code == 3
    assert f"API error ({kind})" in run.stderr
    assert sim.reports.requests == []
    # Retries wait in the upper half of 1, 2, 4 s (backoff_delay's equal jitter).
    ceilings = [1.0, 2.0, 4.0] if kind == "server_error" else []
    assert len(slept) == len(ceilings)
    assert all(c / 2 <= s <= c for s, c in zip(slept, ceilings, strict=True)), slept
    assert sim.count(ingestion_id="up-1") == len(slept) + 1


async def test_a_throttled_poll_is_retried_after_retry_after(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """Two 429s (the exporter may be using the API's budget) and the report still comes."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.inject(Fault(FaultKind.THROTTLE, retry_after=3), count=2)
    slept: list[float] = []
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1", slept=slept)
    assert run.code == 0, run.stderr
    assert slept == [3.0, 3.0]
    assert run.stdout == sim.reports.body("up-1")


async def test_an_unknown_id_exits_3_as_invalid_ingestion_id(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """An id the API rejects is an API failure of kind invalid_ingestion_id."""
    _, url = await start_simulator()
    run = await run_report("--config", str(write_config(tmp_path, url)), "nope")
    assert run.code == 3
    assert "(invalid_ingestion_id)" in run.stderr


async def test_a_bad_config_or_id_is_a_usage_error_exit_2(tmp_path: Path) -> None:
    """An invalid config file, a missing one, or an id with control characters: exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("api: {base_url: 'ftp://x', max_report_bytes: 10}\n")
    run = await run_report("--config", str(bad), "up-1")
    assert run.code == 2
    assert "api.max_report_bytes" in run.stderr
    assert (await run_report("--config", str(tmp_path / "missing.yaml"), "up-1")).code == 2
    with pytest.raises(SystemExit) as exited:
        await run_report("--config", str(bad), "up\n1")
    assert exited.value.code == 2


def sigv4_with_session_token(_: AuthConfig) -> RequestAuth:
    """SigV4 with the simulator's key and a session token (as under IRSA or an assumed role)."""
    credentials = Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, SESSION_TOKEN)
    return SigV4Auth(region=TEST_REGION, credentials=credentials)


@pytest.mark.parametrize("mode", ["bearer-custom-header", "bearer-authorization", "sigv4-token"])
async def test_the_report_host_never_receives_an_api_credential(
    start_simulator: SimulatorFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """The API gets its credential (and accepts it); the report host, the same simulator,
    gets none: no Authorization, no token header, no X-Amz-* header, no token anywhere."""
    auth: Callable[[AuthConfig], RequestAuth] | None = None
    if mode == "sigv4-token":
        sim, url = await start_simulator(auth="sigv4")
        api_auth: dict[str, Any] = {"type": "sigv4", "region": TEST_REGION}
        auth = sigv4_with_session_token
    else:
        header = "X-Api-Key" if mode == "bearer-custom-header" else "Authorization"
        sim, url = await start_simulator(auth="bearer", tokens=[TOKEN], token_header=header)
        monkeypatch.setenv("CATALOG_TOKEN", TOKEN)
        scheme = "" if header != "Authorization" else "Bearer"
        api_auth = {"type": "bearer", "token_env": "CATALOG_TOKEN", "header": header}
        api_auth["scheme"] = scheme
    sim.add_upload("up-1", [("FATAL", math.inf)])
    config = str(write_config(tmp_path, url, auth=api_auth))
    run = await run_report("--config", config, "up-1", auth=auth)
    assert run.code == 0, run.stderr
    assert sim.count(ingestion_id="up-1", auth_ok=True) == 1
    assert [(r.outcome, r.credential_headers) for r in sim.reports.requests] == [("served", ())]
    assert TOKEN not in run.stderr
    assert SESSION_TOKEN not in run.stderr


async def test_the_simulator_records_and_refuses_a_report_request_carrying_a_credential(
    start_simulator: SimulatorFactory,
) -> None:
    """The record the test above relies on does see credentials: a token in a custom header,
    an X-Amz-Security-Token, an Authorization header are each refused and named."""
    sim, url = await start_simulator(auth="bearer", tokens=[TOKEN], token_header="X-Api-Key")
    sim.add_upload("up-1", [("FATAL", math.inf)])
    link = aiohttp.client.URL(sim.current("up-1", url)[1], encoded=True)
    sent = [{"X-Api-Key": TOKEN}, {"X-Amz-Security-Token": "t"}, {"Authorization": "Bearer x"}]
    async with aiohttp.ClientSession() as session:
        for headers in sent:
            async with session.get(link, headers=headers) as response:
                assert response.status == 400
    assert [r.credential_headers for r in sim.reports.requests] == [
        ("x-api-key",),
        ("x-amz-security-token",),
        ("authorization",),
    ]


async def test_the_link_and_its_signature_appear_in_no_output_or_log(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """At debug level, on success and on each failure, stdout (when not the report) and
    stderr (messages and log lines) carry no part of the link."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    config = str(write_config(tmp_path, url, max_report_bytes=1024))
    runs = [await run_report("--config", config, "up-1", "-o", str(tmp_path / "r.csv"))]
    sim.reports.report_bytes = 4096
    runs.append(await run_report("--config", config, "up-1"))
    sim.reports.redirect_to = sim.current("up-1", url)[1]
    runs.append(await run_report("--config", config, "up-1"))
    assert [r.code for r in runs] == [0, 4, 3]
    for run in runs:
        assert_no_link(run.stderr)
        assert_no_link(run.stdout)


class UnusedSink:
    """A sink that fails the test if a download reaches it."""

    decodes = True

    async def start(
        self, content_type: str, content_length: int | None, content_encoding: str
    ) -> None:
        raise AssertionError

    async def write(self, chunk: bytes) -> None:
        raise AssertionError


async def test_download_refuses_links_that_are_not_plain_http_urls() -> None:
    """A link with user:password@ (aiohttp would send it as Basic auth) or another scheme is
    refused before any connection, and the message does not repeat it."""
    limits = DownloadLimits(max_bytes=1024, timeout_seconds=1)
    for link, kind in (
        ("https://user:pw@host.invalid/r.csv?X-Amz-Signature=ab", "forbidden_userinfo"),
        ("file:///etc/passwd", "forbidden_scheme"),
    ):
        outcome = await download(link, UnusedSink(), limits)
        assert isinstance(outcome, ReportFailure)
        assert (outcome.problem, outcome.kind) == (ReportProblem.DOWNLOAD_FAILED, kind)
        assert "pw" not in outcome.message and "passwd" not in outcome.message


# -- the admin API ------------------------------------------------------------------------------


Call = Callable[..., Awaitable[tuple[int, dict[str, str], bytes]]]


@pytest.fixture
async def admin_reports(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> AsyncIterator[tuple[Simulator, Call, Any]]:
    """A simulator, an exporter tracking up-1..up-3 against it, and its admin API with the
    report route; every answer (and JSON body) is checked against the OpenAPI document at the
    end."""
    sim, url = await start_simulator(report_chunked=False)
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.add_upload("up-2", [("INPROGRESS", math.inf)])
    sim.add_upload("a/report", [("FATAL", math.inf)])
    config = fast_config(
        url,
        ["up-1", "up-2", "a/report"],
        api={"max_report_bytes": 4096, "report_hosts": SIMULATOR_HOSTS},
    )
    running = await start_exporter(config)
    await wait_for(lambda: _polled(running.exporter))
    observed: set[tuple[str, str | None, int]] = set()
    sent: Sent = []
    app = create_admin_app(running.exporter.tracker, reports=running.exporter.fetch_report)
    app.middlewares.insert(0, recorder(observed, sent))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()

    async def call(path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        target = aiohttp.client.URL(str(server.make_url("")).rstrip("/") + path, encoded=True)
        async with aiohttp.ClientSession() as session, session.get(target, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    yield sim, call, running
    await server.close()
    assert undocumented(observed) == []
    assert off_schema(sent) == []


async def _polled(exporter: Any) -> bool:
    return all(exporter.tracker.view(i).status != "UNKNOWN" for i in ("up-1", "up-2"))


async def test_admin_report_route_streams_the_report(
    admin_reports: tuple[Simulator, Call, Any],
) -> None:
    """GET .../{id}/report answers 200 with the report as an attachment; no credential went
    to the report host and the exporter's log holds no part of the link."""
    sim, call, running = admin_reports
    status, headers, body = await call("/api/v1/ingestions/up-1/report")
    assert status == 200
    assert body == sim.reports.body("up-1")
    assert headers["Content-Type"].startswith("text/csv")
    assert headers["Content-Disposition"] == 'attachment; filename="up-1.csv"'
    assert [(r.outcome, r.credential_headers) for r in sim.reports.requests] == [("served", ())]
    assert_no_link(running.logs.getvalue())


async def test_admin_report_route_answers_json_errors_before_any_byte(
    admin_reports: tuple[Simulator, Call, Any],
) -> None:
    """Not tracked: 404; no report yet: 409 naming the status; over max_report_bytes with a
    Content-Length: 502 report_too_large. Each is a JSON error without the link."""
    sim, call, running = admin_reports
    status, _, body = await call("/api/v1/ingestions/nope/report")
    assert (status, json.loads(body)["error"]) == (404, "not_found")
    status, _, body = await call("/api/v1/ingestions/up-2/report")
    assert (status, json.loads(body)["error"]) == (409, "report_not_ready")
    assert "INPROGRESS" in json.loads(body)["message"]
    sim.reports.report_bytes = 8192
    status, _, body = await call("/api/v1/ingestions/up-1/report")
    assert (status, json.loads(body)["error"]) == (502, "report_too_large")
    assert_no_link(body)
    assert_no_link(running.logs.getvalue())


async def test_admin_report_route_cuts_the_connection_when_a_chunked_report_grows_too_large(
    admin_reports: tuple[Simulator, Call, Any],
) -> None:
    """Past max_report_bytes mid-stream the headers are out: the connection is cut, so the
    client sees a broken transfer, never a short report that looks whole."""
    sim, call, _ = admin_reports
    sim.reports.report_bytes = 8192
    sim.reports.chunked = True
    with pytest.raises(aiohttp.ClientPayloadError):
        await call("/api/v1/ingestions/up-1/report")


async def test_an_id_ending_in_slash_report_is_shown_not_reported(
    admin_reports: tuple[Simulator, Call, Any],
) -> None:
    """ "a/report" sent as a%2Freport reaches the upload's view, not the report route."""
    sim, call, _ = admin_reports
    status, _, body = await call("/api/v1/ingestions/a%2Freport")
    assert status == 200
    assert json.loads(body)["ingestionId"] == "a/report"
    status, _, body = await call("/api/v1/ingestions/a%2Freport/report")
    assert status == 200
    assert body == sim.reports.body("a/report")


async def test_admin_report_route_needs_the_admin_token(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """With admin.token_file, the report route answers 401 without the token."""
    _, url = await start_simulator()
    running = await start_exporter(fast_config(url, ["up-1"]))
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-secret\n")
    app = create_admin_app(
        running.exporter.tracker,
        token_file=str(token_file),
        reports=running.exporter.fetch_report,
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/api/v1/ingestions/up-1/report")) as response,
        ):
            assert response.status == 401
    finally:
        await server.close()


def test_fetched_and_failure_carry_no_link() -> None:
    """The outcome types have no field that could hold the link."""
    assert set(ReportFetched.__dataclass_fields__) == {"size", "status", "host"}
    assert set(ReportFailure.__dataclass_fields__) == {"problem", "kind", "message", "status"}


# -- the demo -------------------------------------------------------------------------------------


async def test_the_demo_banner_report_line_downloads_a_fatal_demo_report(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """The exact shell line the `--demo` banner prints, run by a shell against the demo's
    simulator (SigV4 with its test key), writes demo-fatal's report to stdout."""
    clock = [1000.0]
    sim, url = await start_simulator(auth="sigv4", clock=lambda: clock[0])
    sim.add_uploads(demo_uploads())
    clock[0] += 60  # every demo upload has reached its last status
    line = report_example(write_report_config(url, tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", line, env=env, stdout=PIPE, stderr=PIPE
    )
    stdout, stderr = await asyncio.wait_for(shell.communicate(), timeout=60)
    assert shell.returncode == 0, stderr.decode()
    assert stdout == sim.reports.body(REPORT_EXAMPLE_ID)
    assert sim.current(REPORT_EXAMPLE_ID)[0] == "FATAL"
    assert sim.count(ingestion_id=REPORT_EXAMPLE_ID, auth_ok=True) == 1
    assert_no_link(stderr)


# -- runbooks, alerts and the dashboard -----------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
#: The command as the runbooks, the alerts and the dashboard give it (container name included).
IN_CONTAINER = "-c catalog-upload-exporter -- catalog-upload-exporter report"


def runbook(heading: str) -> str:
    """The text of docs/alerts.md under `## heading`, up to the next heading of that level."""
    text = (ROOT / "docs" / "alerts.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = re.search(r"\n##+ ", text[start + 1 :])
    return text[start : start + 1 + end.start()] if end else text[start:]


@pytest.mark.parametrize("alert", ["CatalogUploadFatal", "CatalogUploadCancelled"])
def test_fatal_and_cancelled_runbooks_and_alerts_give_the_report_command(alert: str) -> None:
    """The runbook gives the kubectl exec line; the alert's description carries the id in the
    same command (and the kubectl form when the series has pod labels)."""
    assert f"kubectl exec -n NAMESPACE POD {IN_CONTAINER} '<id>'" in runbook(alert)
    rules = yaml.safe_load(
        (ROOT / "deploy" / "prometheus" / "catalog-upload-exporter.rules.yml").read_text()
    )
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    description = " ".join(rule["annotations"]["description"].split())
    # Rendered (tests/rules) as a kubectl exec line when the pod label is there, else bare.
    assert (
        "kubectl exec -n {{ $labels.namespace }} {{ $labels.pod }} -c catalog-upload-exporter -- "
        "{{ end }}catalog-upload-exporter report '{{ $labels.ingestion_id }}'"
    ) in description


def test_the_container_and_config_path_the_runbook_assumes_are_the_manifests() -> None:
    """`-c catalog-upload-exporter` names the exporter's container in the sidecar component and
    the sharded StatefulSet, and the command's default --config is the path they give it."""
    for manifest in ("components/sidecar/sidecar.yaml", "overlays/sharded/statefulset.yaml"):
        document = yaml.safe_load((ROOT / "deploy" / manifest).read_text())
        spec = document["spec"]["template"]["spec"]
        containers = spec.get("initContainers", []) + spec.get("containers", [])
        (exporter,) = [c for c in containers if c["name"] == "catalog-upload-exporter"]
        args = exporter["args"]
        assert args[args.index("--config") + 1] == report_command.DEFAULT_CONFIG_PATH, manifest


def test_the_attention_table_shows_the_report_command_for_the_rows_id() -> None:
    """The dashboard's attention table links each ingestion id to the report command for that
    id (a data link titled with the command) and to the docs' section on it."""
    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "catalog-upload-exporter.json").read_text()
    )
    (table,) = [p for p in dashboard["panels"] if p.get("title") == "Uploads needing attention"]
    (override,) = [
        o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Ingestion id"
    ]
    (links,) = [p["value"] for p in override["properties"] if p["id"] == "links"]
    (link,) = links
    assert f"{IN_CONTAINER} '${{__value.raw}}'" in link["title"]
    assert link["url"].endswith("/docs/operations.md#the-report-command")
    assert "\n## The `report` command\n" in (ROOT / "docs" / "operations.md").read_text()


async def test_a_token_echoed_by_the_api_reaches_neither_stderr_nor_the_admin_route(
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway that echoes our bearer token (bare, in a custom header) in its error message:
    the command's message and the admin route's JSON error show `<secret>` instead."""
    sim, url = await start_simulator(auth="bearer", tokens=[TOKEN], token_header="X-Api-Key")
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.inject(Fault(FaultKind.UNAUTHORIZED, body=f"token {TOKEN} is not allowed here"))
    monkeypatch.setenv("CATALOG_TOKEN", TOKEN)
    api_auth = {"type": "bearer", "token_env": "CATALOG_TOKEN", "header": "X-Api-Key", "scheme": ""}
    run = await run_report("--config", str(write_config(tmp_path, url, auth=api_auth)), "up-1")
    assert run.code == 3
    assert "is not allowed here" in run.stderr
    assert TOKEN not in run.stderr
    running = await start_exporter(
        fast_config(url, [], api={"auth": api_auth, "report_hosts": SIMULATOR_HOSTS})
    )
    await running.exporter.tracker.register("up-1", Source.API, None)
    app = create_admin_app(running.exporter.tracker, reports=running.exporter.fetch_report)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/api/v1/ingestions/up-1/report")) as response,
        ):
            body = await response.json()
    finally:
        await server.close()
    assert (response.status, body["error"]) == (502, "api_error")
    assert "is not allowed here" in body["message"]
    assert TOKEN not in body["message"]
