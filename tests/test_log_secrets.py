"""Secrets echoed back by a hostile API never reach a log line, in any form, after rotation too."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from botocore.credentials import Credentials

from exporter.auth import RequestAuth, SigV4Auth
from exporter.config import AuthConfig
from exporter.simulator import TEST_ACCESS_KEY_ID, TEST_REGION, TEST_SECRET_ACCESS_KEY, Fault
from tests.conftest import (
    ExporterFactory,
    RunningExporter,
    SimulatorFactory,
    fast_config,
    free_port,
    launch_exporter,
    value,
    wait_for,
)

TOKEN = "tok-91c3e0d2-SECRET-first"
ROTATED = "tok-4be1a7f9-SECRET-second"
SESSION_TOKEN = "FwoGZXIvYXdzSESSION-9d2e7c"
ADMIN_TOKEN = "adm-52f0c8e1-SECRET-admin"

#: Error messages a gateway might send back, each hiding a credential in another form.
ECHOES = (
    f"gateway saw Authorization: Bearer {TOKEN}",
    "report at https%3A%2F%2Fb.s3.amazonaws.com%2Fr.csv%3FX-Amz-Credential%3DASIAENCODED"
    "%26X-Amz-Signature%3Dsig5ec7e7encoded",
    "legacy link Signature=sigv2c0ffee&AWSAccessKeyId=AKIAV2LEAKED&Expires=1",
    "upstream https://svc:hunter2pass@internal.example/x failed",
    'retry with X-Amz-Signature="quoted5ec7e7" please',
    f"your token {TOKEN} is not allowed here",
)
LEAKS = (TOKEN, "ASIAENCODED", "sig5ec7e7encoded", "sigv2c0ffee", "AKIAV2LEAKED", "hunter2pass")


def _echo(text: str) -> Fault:
    return Fault("server_error_json", body=json.dumps({"errorMsg": text}))


async def _errors_at_least(running: RunningExporter, n: int) -> bool:
    samples = await running.scrape()
    return (value(samples, "catalog_api_errors_total", kind="server_error") or 0) >= n


def _poll_failures(logs: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in logs.splitlines()]  # every line is one JSON object
    return [e for e in events if e["event"] == "poll_failed"]


async def test_echoed_credentials_are_redacted_and_a_rotated_token_is_masked(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """Every echoed form is redacted; after rotation the new token is masked from the start."""
    sim, url = await start_simulator(auth="bearer", tokens=[TOKEN])
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    for text in ECHOES:
        sim.inject(_echo(text), count=1)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = fast_config(
        url, ["up-1"], api={"auth": {"type": "bearer", "token_file": str(token_file)}}
    )
    running = await start_exporter(config)
    await wait_for(lambda: _errors_at_least(running, len(ECHOES)))
    await wait_for(running.status_is("up-1", "INPROGRESS"))

    sim.set_tokens([ROTATED])
    staged = tmp_path / "token.new"
    staged.write_text(ROTATED)
    staged.replace(token_file)
    sim.inject(_echo(f"now echoing {ROTATED} and {quote(ROTATED, safe='')}"), count=1)
    await wait_for(lambda: _errors_at_least(running, len(ECHOES) + 1))

    logs = running.logs.getvalue()
    messages = [str(e["message"]) for e in _poll_failures(logs)]
    assert len(messages) >= len(ECHOES) + 1
    assert any("Authorization: Bearer <redacted>" in m for m in messages)
    assert any("now echoing <secret>" in m for m in messages)
    for leaked in (*LEAKS, ROTATED):
        assert leaked not in logs


def _session_credentials(_: AuthConfig) -> RequestAuth:
    return SigV4Auth(
        region=TEST_REGION,
        credentials=Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, SESSION_TOKEN),
    )


async def test_aws_secret_key_and_session_token_echoed_are_masked(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> None:
    """The AWS secret access key and session token are masked verbatim and percent-encoded."""
    sim, url = await start_simulator(auth="sigv4")
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    sim.inject(_echo(f"key {TEST_SECRET_ACCESS_KEY} session {SESSION_TOKEN}"), count=1)
    sim.inject(_echo(f"encoded key {quote(TEST_SECRET_ACCESS_KEY, safe='')}"), count=1)
    config = fast_config(url, ["up-1"], api={"auth": {"type": "sigv4", "region": TEST_REGION}})
    running = await start_exporter(config, auth_factory=_session_credentials)
    await wait_for(lambda: _errors_at_least(running, 2))
    logs = running.logs.getvalue()
    assert any("key <secret> session <secret>" in str(e["message"]) for e in _poll_failures(logs))
    for leaked in (TEST_SECRET_ACCESS_KEY, quote(TEST_SECRET_ACCESS_KEY, safe=""), SESSION_TOKEN):
        assert leaked not in logs


def _get(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback only
        return int(response.status)


async def test_the_exporter_process_masks_its_api_and_admin_tokens(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """The real process: the API token and the admin token, echoed, never reach stdout."""
    sim, url = await start_simulator(auth="bearer", tokens=[TOKEN])
    sim.add_upload("up-1", [("INPROGRESS", 0)])
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN)
    admin_port, metrics_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api: {{base_url: '{url}', auth: {{type: bearer, token_file: '{tmp_path}/token'}}}}\n"
        "polling: {interval_seconds: 0.2, initial_backoff_seconds: 0.05,"
        " max_backoff_seconds: 0.2}\n"
        "ingestions: {ids: [up-1]}\n"
        f"server: {{host: 127.0.0.1, port: {metrics_port}}}\n"
        f"admin: {{host: 127.0.0.1, port: {admin_port}, token_file: '{tmp_path}/admin-token'}}\n"
        "reload: {watch_interval_seconds: 0}\n"
    )
    proc, stdout = launch_exporter(tmp_path, config)
    try:
        admin = f"http://127.0.0.1:{admin_port}/api/v1/ingestions"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert await asyncio.to_thread(_get, admin, ADMIN_TOKEN) == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                await asyncio.sleep(0.1)
        sim.inject(_echo(f"marker-1 api {TOKEN} admin {ADMIN_TOKEN}"), count=1)

        async def logged() -> bool:
            return "marker-1" in stdout.read_text()

        await wait_for(logged, timeout=20)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait)
    logs = stdout.read_text()
    assert "marker-1 api <secret> admin <secret>" in logs
    assert TOKEN not in logs
    assert ADMIN_TOKEN not in logs
