"""The exporter authenticating to a simulator that checks credentials for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.credentials import Credentials

from exporter.auth import RequestAuth, SigV4Auth
from exporter.config import AuthConfig
from exporter.simulator import TEST_ACCESS_KEY_ID, TEST_REGION, Fault
from tests.conftest import (
    ExporterFactory,
    SimulatorFactory,
    fast_config,
    simulator_sigv4_auth,
    value,
    wait_for,
)

TOKEN = "tok-6f1c2d0e-SECRET-do-not-log"
LINK_SIGNATURE_MARKER = "X-Amz-Signature"


async def test_sigv4_signed_polls_are_accepted(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """The simulator verifies each SigV4 signature with botocore and answers 200."""
    sim, url = await start_simulator(auth="sigv4")
    sim.add_upload("up-1", [("DONE", 0)])
    config = fast_config(url, ["up-1"], api={"auth": {"type": "sigv4", "region": TEST_REGION}})
    running = await start_exporter(config, auth_factory=simulator_sigv4_auth)
    await wait_for(running.status_is("up-1", "DONE"))
    assert sim.count(auth_ok=False) == 0


async def test_sigv4_with_a_wrong_secret_is_rejected_and_counted_unauthorized(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """A wrong secret key gets 403 from the simulator: kind unauthorized, status UNKNOWN."""
    sim, url = await start_simulator(auth="sigv4")
    sim.add_upload("up-1", [("DONE", 0)])

    def wrong_key(_: AuthConfig) -> RequestAuth:
        return SigV4Auth(region=TEST_REGION, credentials=Credentials(TEST_ACCESS_KEY_ID, "wrong"))

    config = fast_config(url, ["up-1"], api={"auth": {"type": "sigv4", "region": TEST_REGION}})
    running = await start_exporter(config, auth_factory=wrong_key)

    async def unauthorized() -> bool:
        samples = await running.scrape()
        return (value(samples, "catalog_api_errors_total", kind="unauthorized") or 0) >= 2

    await wait_for(unauthorized)
    assert await running.status_of("up-1") == "UNKNOWN"
    assert sim.count(auth_ok=True) == 0
    assert "wrong" not in running.logs.getvalue().replace("wrong_", "")


async def test_bearer_token_and_report_links_never_reach_logs_or_metrics(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """During a faulty run at debug level, neither the token nor a link signature is printed."""
    sim, url = await start_simulator(auth="bearer", tokens=[TOKEN])
    sim.add_upload("up-1", [("INQUEUE", 0.3), ("DONE", 0)])
    sim.add_upload("up-2", [("FATAL", 0)])
    sim.inject(Fault("server_error_html", status=503), count=2)
    sim.inject(Fault("unauthorized"), count=1)
    # An error page quoting a presigned link: the message is logged, the signature must not be.
    link = "https://r.s3.amazonaws.com/up-1.csv?X-Amz-Credential=A&X-Amz-Signature=f00d"
    sim.inject(Fault("server_error_html", status=502, body=f"<a href='{link}'>x</a>"), count=1)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = fast_config(
        url,
        ["up-1", "up-2", "nosuch"],
        api={"auth": {"type": "bearer", "token_file": str(token_file)}},
        logging={"level": "debug"},
    )
    running = await start_exporter(config)
    await wait_for(running.status_is("up-1", "DONE"))
    await wait_for(running.status_is("up-2", "FATAL"))
    _, _, metrics = await running.get("/metrics")
    _, _, landing = await running.get("/")
    assert "https://r.s3.amazonaws.com/up-1.csv?<redacted>" in running.logs.getvalue()
    for text in (running.logs.getvalue(), metrics.decode(), landing.decode()):
        assert TOKEN not in text
        assert LINK_SIGNATURE_MARKER not in text
        assert "f00d" not in text
    assert (
        value(await running.scrape(), "catalog_upload_report_available", ingestion_id="up-1") == 1
    )


async def test_rotated_token_file_is_used_without_a_restart(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """Replacing the token file switches tokens; the simulator accepting only the new one agrees."""
    sim, url = await start_simulator(auth="bearer", tokens=["old-token"])
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    token_file = tmp_path / "token"
    token_file.write_text("old-token")
    config = fast_config(
        url, ["up-1"], api={"auth": {"type": "bearer", "token_file": str(token_file)}}
    )
    running = await start_exporter(config)
    await wait_for(running.status_is("up-1", "INPROGRESS"))
    sim.set_tokens(["new-token"])
    staged = tmp_path / "token.new"
    staged.write_text("new-token")
    staged.replace(token_file)
    accepted_before = sim.count(auth_ok=True)

    async def new_token_accepted() -> bool:
        return sim.count(auth_ok=True) > accepted_before

    await wait_for(new_token_accepted)


def _events(logs: str, event: str) -> list[dict[str, object]]:
    return [e for e in map(json.loads, logs.splitlines()) if e["event"] == event]


@pytest.mark.slow
async def test_a_credentials_problem_is_logged_once_per_distinct_problem_and_counted(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """Many uploads failing for want of a token log one line per problem, not one per poll;
    every failure is counted by kind, and recovery is logged once."""
    sim, url = await start_simulator(auth="bearer", tokens=[TOKEN])
    ids = [f"up-{n}" for n in range(5)]
    for ingestion_id in ids:
        sim.add_upload(ingestion_id, [("INPROGRESS", 0)])
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    auth = {"type": "bearer", "token_file": str(token_file)}
    running = await start_exporter(fast_config(url, ids, api={"auth": auth}))
    await wait_for(running.status_is("up-0", "INPROGRESS"))

    async def counted(kind: str, n: int) -> bool:
        samples = await running.scrape()
        return (value(samples, "catalog_exporter_auth_errors_total", kind=kind) or 0) >= n

    token_file.unlink()
    await wait_for(lambda: counted("token_unreadable", 3 * len(ids)))
    token_file.write_text("")
    await wait_for(lambda: counted("token_invalid", 3 * len(ids)))
    token_file.write_text(TOKEN)
    await wait_for(lambda: _has_event(running.logs.getvalue(), "credentials_available"))

    logs = running.logs.getvalue()
    problems = [e["kind"] for e in _events(logs, "credentials_unavailable")]
    assert problems == ["token_unreadable", "token_invalid"]
    assert len(_events(logs, "credentials_available")) == 1
    assert _events(logs, "poll_failed") == []
    samples = await running.scrape()
    assert (value(samples, "catalog_api_errors_total", kind="unauthorized") or 0) >= 6 * len(ids)


async def _has_event(logs: str, event: str) -> bool:
    return bool(_events(logs, event))
