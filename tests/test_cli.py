"""The command line contract, exercised as users run it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.demo import cli_command, demo_config
from exporter.simulator import Fault
from exporter.yamlfile import MAX_CONFIG_BYTES
from tests.conftest import (
    EXPORTER_COMMAND,
    SimulatorFactory,
    free_port,
    free_port_pair,
    launch,
    launch_exporter,
    parse_exposition,
    requests_seen,
    value,
    wait_for,
)

EXPORTER = list(EXPORTER_COMMAND)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_http(url: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = http_get(url)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer 200 within {timeout} s")


class Process:
    """A child process started by `tests.conftest.launch`, its output read from its log."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    def exporter(cls, config: Path) -> Process:
        """`python -m exporter --config config`, logging beside the config."""
        return cls(*launch_exporter(config.parent, config))

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def lines(self) -> list[str]:
        """The complete lines written so far (not one still being written)."""
        output = self.output
        return output[: output.rfind("\n") + 1].splitlines(keepends=True)

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def wait_for_event(self, event: str, timeout: float = 10.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.events():
                if record.get("event") == event:
                    return record
            time.sleep(0.05)
        pytest.fail(f"no {event!r} log line within {timeout} s; output:\n{self.output}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    """`python -m exporter.simulator` on a free port, with demo uploads and bearer auth."""
    port = free_port()
    argv = [sys.executable, "-m", "exporter.simulator", "--port", str(port)]
    argv += ["--rate-limit", "0", "--uploads", "demo"]
    log = tmp_path / "simulator.log"
    proc = Process(launch(argv, log), log)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz")
    yield url
    assert proc.stop() == 0


def write_config(path: Path, base_url: str, ids: list[str], port: int, **extra: str) -> Path:
    lines = [
        "api:",
        f"  base_url: {base_url}",
        "  auth: {type: none}",
        "  timeout_seconds: 5",
        "  max_requests_per_second: 50",
        "polling:",
        "  interval_seconds: 0.2",
        "ingestions:",
        f"  ids: {json.dumps(ids)}",
        "server:",
        "  host: 127.0.0.1",
        f"  port: {port}",
        "reload:",
        f"  watch_interval_seconds: {extra.get('watch', '0')}",
        "admin:",
        "  port: 0",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_check_config_accepts_the_example_config() -> None:
    """--check-config on config.example.yaml exits 0 and says OK."""
    result = subprocess.run(
        [*EXPORTER, "--config", "config.example.yaml", "--check-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_config_names_every_bad_key_and_exits_2(tmp_path: Path) -> None:
    """Each bad key path is named, with no traceback, and the exit code is 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "api:\n  base_url: ftp://x\n  timeout_seconds: -1\n  auth: {type: kerberos}\n"
        "polling:\n  interval_secs: 5\n"
    )
    result = subprocess.run(
        [*EXPORTER, "--config", str(bad), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    for key in ("api.base_url", "api.timeout_seconds", "api.auth.type", "polling.interval_secs"):
        assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_refuses_a_repeated_section_naming_it_and_both_lines(tmp_path: Path) -> None:
    """Two `polling:` sections exit 2 naming the key and both lines, not keeping the last."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "api:\n  base_url: http://127.0.0.1:1\n  auth: {type: none}\n"
        "polling:\n  interval_seconds: 10\n"
        "ingestions:\n  ids: [a]\n"
        "polling:\n  jitter_ratio: 0.2\n"
    )
    result = subprocess.run(
        [*EXPORTER, "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "  - polling: key repeated in " in result.stderr
    assert "at lines 4 and 8" in result.stderr
    assert "Traceback" not in result.stderr


#: A secret access key shaped like AWS's, pasted where it does not belong.
PASTED_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"
_API = "api:\n  base_url: https://api.example.com\n"


@pytest.mark.parametrize(
    ("text", "environ", "key"),
    [
        pytest.param(
            f"{_API}  auth:\n    region: us-east-1\n    role_arn: {PASTED_SECRET}\n",
            {},
            "api.auth.role_arn",
            id="api.auth.role_arn",
        ),
        pytest.param(
            f"{_API}  auth:\n    region: {PASTED_SECRET}\n", {}, "api.auth.region", id="region"
        ),
        pytest.param(
            f"{_API}  auth: {{}}\n",
            {"AWS_REGION": PASTED_SECRET},
            "api.auth.region",
            id="AWS_REGION",
        ),
        pytest.param(
            f"{_API}  auth:\n    region: us-east-1\n    {PASTED_SECRET}: x\n",
            {},
            "api.auth.<a key of 41 characters, not shown>",
            id="key-name-in-api.auth",
        ),
        pytest.param(
            f"{_API}  auth: {{region: us-east-1}}\n{PASTED_SECRET}: 1\n",
            {},
            "<a key of 41 characters, not shown>",
            id="key-name-at-top-level",
        ),
        pytest.param(
            f"{_API}  auth:\n    region: us-east-1\n    {PASTED_SECRET}: 1\n"
            f"    {PASTED_SECRET}: 2\n",
            {},
            "api.auth.<a key of 41 characters, not shown>: key repeated",
            id="key-name-repeated",
        ),
        pytest.param(
            f"{_API}  auth: {{type: {PASTED_SECRET}}}\n", {}, "api.auth.type", id="auth.type"
        ),
        pytest.param(f"{_API}  auth: {PASTED_SECRET}\n", {}, "api.auth", id="auth-scalar"),
        pytest.param(
            f"{_API}  auth:\n    type: bearer\n    token_file: {PASTED_SECRET}\n",
            {},
            "api.auth.token_file",
            id="api.auth.token_file",
        ),
        pytest.param(
            f"{_API}  auth: {{region: us-east-1}}\nadmin:\n  token_file: {PASTED_SECRET}\n",
            {},
            "admin.token_file",
            id="admin.token_file",
        ),
        pytest.param(
            f"{_API}  auth: {{region: us-east-1}}\nnotifications:\n  sqs:\n"
            f"    queue_url: https://sqs.us-east-1.amazonaws.com/1/q\n"
            f"    region: {PASTED_SECRET}\n",
            {},
            "notifications.sqs.region",
            id="notifications.sqs.region",
        ),
        pytest.param(f"{PASTED_SECRET}\n", {}, "(top level)", id="the-whole-file"),
    ],
)
def test_check_config_never_prints_a_secret_pasted_into_the_wrong_key(
    tmp_path: Path, text: str, environ: dict[str, str], key: str
) -> None:
    """A secret in api.auth, a token setting, a region, or as a key name: --check-config
    names the key and exits 2, and the secret (in any case) is nowhere in its output."""
    config = tmp_path / "c.yaml"
    config.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    result = subprocess.run(
        [*EXPORTER, "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
        env={**env, **environ},
    )
    output = (result.stdout + result.stderr).lower()
    assert PASTED_SECRET.lower() not in output
    assert PASTED_SECRET.lower()[:16] not in output  # nor a telling part of it
    assert result.returncode == 2, result.stdout
    assert f"  - {key}" in result.stderr


def test_reload_of_an_oversize_config_file_keeps_the_running_config(
    simulator: str, tmp_path: Path
) -> None:
    """A valid file over the size cap is refused on SIGHUP: the old ids stay, metric says 0."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", simulator, ["demo-done-01"], port)
    proc = Process.exporter(config)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_http(metrics_url)
        write_config(config, simulator, ["demo-fatal-02"], port)
        padding = "#" + "x" * 1023 + "\n"  # a valid document: the size alone is wrong
        with config.open("a") as file:
            file.write(padding * (MAX_CONFIG_BYTES // len(padding) + 1))
        proc.proc.send_signal(signal.SIGHUP)
        record = proc.wait_for_event("config_reload_failed")
        assert "larger than" in str(record["problems"])
        samples = parse_exposition(http_get(metrics_url)[1])
        assert value(samples, "catalog_exporter_config_last_reload_successful") == 0.0
        ids = {
            dict(labels).get("ingestion_id")
            for (n, labels) in samples
            if n == "catalog_upload_status"
        }
        assert ids == {"demo-done-01"}
    finally:
        assert proc.stop() == 0


def test_running_with_a_missing_token_file_exits_2(tmp_path: Path) -> None:
    """A bearer token file that does not exist stops start-up with exit code 2."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "api:\n  base_url: http://127.0.0.1:1\n"
        f"  auth: {{type: bearer, token_file: {tmp_path / 'nope'}}}\n"
    )
    result = subprocess.run(
        [*EXPORTER, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert result.returncode == 2
    assert "api.auth.token_file" in result.stderr


def test_check_config_stays_strict_with_on_invalid_config_serve(tmp_path: Path) -> None:
    """--check-config exits 2 on a missing token file even with --on-invalid-config=serve,
    which only changes what running does."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "api:\n  base_url: http://127.0.0.1:1\n"
        f"  auth: {{type: bearer, token_file: {tmp_path / 'nope'}}}\n"
    )
    result = subprocess.run(
        [*EXPORTER, "--config", str(config), "--check-config", "--on-invalid-config=serve"],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert result.returncode == 2
    assert "api.auth.token_file" in result.stderr


def test_a_state_path_naming_the_config_file_exits_2_and_leaves_the_file(tmp_path: Path) -> None:
    """state.path equal to the config file: exit 2 naming state.path; not renamed nor written."""
    config = tmp_path / "c.yaml"
    text = "api: {base_url: 'http://127.0.0.1:1', auth: {type: none}}\n" + (
        f"state: {{path: {config}}}\n"
    )
    config.write_text(text)

    result = subprocess.run(
        [*EXPORTER, "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )

    assert result.returncode == 2
    assert "state.path" in result.stderr and "the config file" in result.stderr
    assert config.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_no_arguments_is_a_usage_error() -> None:
    """Without --config or --demo the exit code is 2 with a hint."""
    result = subprocess.run(EXPORTER, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--demo" in result.stderr


def test_sighup_reloads_ids_and_a_bad_config_is_rejected(simulator: str, tmp_path: Path) -> None:
    """SIGHUP applies added/removed ids and logs the trigger, the counts and each removed id;
    an invalid file keeps the old config, metric says 0."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", simulator, ["demo-done-01"], port)
    proc = Process.exporter(config)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_http(metrics_url)
        write_config(config, simulator, ["demo-fatal-02"], port)
        proc.proc.send_signal(signal.SIGHUP)
        reloaded = proc.wait_for_event("config_reloaded")
        assert (reloaded["trigger"], reloaded["ids_added"], reloaded["ids_removed"]) == (
            "sighup",
            1,
            1,
        )
        removed = proc.wait_for_event("ingestion_removed")
        assert (removed["ingestion_id"], removed["source"]) == ("demo-done-01", "config")
        samples = parse_exposition(http_get(metrics_url)[1])
        ids = {
            dict(labels).get("ingestion_id")
            for (n, labels) in samples
            if n == "catalog_upload_status"
        }
        assert ids == {"demo-fatal-02"}
        assert value(samples, "catalog_exporter_config_last_reload_successful") == 1.0

        config.write_text("api: [this is not a mapping\n")
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for_event("config_reload_failed")
        samples = parse_exposition(http_get(metrics_url)[1])
        assert value(samples, "catalog_exporter_config_last_reload_successful") == 0.0
        assert value(samples, "catalog_exporter_config_valid") == 0.0  # the old config runs
        ids = {
            dict(labels).get("ingestion_id")
            for (n, labels) in samples
            if n == "catalog_upload_status"
        }
        assert ids == {"demo-fatal-02"}
        assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        assert proc.stop() == 0


def test_config_file_change_is_picked_up_without_a_signal(simulator: str, tmp_path: Path) -> None:
    """With reload.watch_interval_seconds set, editing the file is enough (logged as a file
    trigger)."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", simulator, ["demo-done-01"], port, watch="0.2")
    proc = Process.exporter(config)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        write_config(config, simulator, ["demo-done-01", "demo-fatal-02"], port, watch="0.2")
        record = proc.wait_for_event("config_applied")
        assert record["tracked_ingestions"] == 2
        reloaded = proc.wait_for_event("config_reloaded")
        assert (reloaded["trigger"], reloaded["ids_added"], reloaded["ids_removed"]) == (
            "file",
            1,
            0,
        )
    finally:
        assert proc.stop() == 0


@pytest.mark.slow
async def test_sigterm_with_requests_in_flight_exits_0(
    start_simulator: SimulatorFactory, tmp_path: Path
) -> None:
    """SIGTERM while a poll hangs: it ends within the grace (api.timeout_seconds), exit 0."""
    sim, url = await start_simulator()
    sim.add_upload("hanging", [("INPROGRESS", 0)])
    sim.inject(Fault("hang"), ingestion_id="hanging")  # logged as it arrives, never answered
    port = free_port()
    config = write_config(tmp_path / "c.yaml", url, ["hanging"], port)
    config.write_text(config.read_text().replace("timeout_seconds: 5", "timeout_seconds: 2"))
    proc = Process.exporter(config)
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/readyz")
        await wait_for(requests_seen(sim, "hanging"))  # a poll is in flight, hanging
        assert [r.status for r in sim.requests] == [None]
        started = time.monotonic()
        assert await asyncio.to_thread(proc.stop) == 0
        assert time.monotonic() - started < 2 + 3  # grace (api.timeout_seconds) + slack
    finally:
        await asyncio.to_thread(proc.stop)
    events = [e["event"] for e in proc.events()]
    assert "shutting_down" in events and "exporter_stopped" in events


def test_logs_are_one_json_object_per_line_with_timestamp_level_event(
    simulator: str, tmp_path: Path
) -> None:
    """Every stdout line is a JSON object carrying timestamp, level and event."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", simulator, ["demo-done-01", "nosuch"], port)
    proc = Process.exporter(config)
    try:
        proc.wait_for_event("poll_failed")
    finally:
        assert proc.stop() == 0
    lines = [line for line in proc.lines if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"timestamp", "level", "event"} <= record.keys(), line


def banner_command(output: str, start: str) -> list[str]:
    """The command of the demo banner's line that starts with `start`, split as a shell would."""
    lines = [line.strip() for line in output.splitlines()]
    return shlex.split(next(line for line in lines if line.startswith(start)))


#: The clone's root, where `make demo` runs `.venv/bin/catalog-upload-exporter --demo`.
CLONE = Path(__file__).resolve().parent.parent
#: The command the virtualenv installs (`make demo` runs it by this path).
VENV_COMMAND = Path(sys.executable).parent / "catalog-upload-exporter"


def path_without_the_command() -> str:
    """PATH as after a fresh clone and `make demo`: no directory holding the command."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(
        e for e in entries if e and not (Path(e) / "catalog-upload-exporter").exists()
    )


def test_the_banner_command_is_the_path_make_demo_ran_when_path_lacks_it(tmp_path: Path) -> None:
    """Started as `.venv/bin/catalog-upload-exporter` from the clone with nothing on PATH, the
    banner names that relative path; found on PATH, the bare name; run as a module,
    `python -m exporter`."""
    script = tmp_path / ".venv" / "bin" / "catalog-upload-exporter"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n", encoding="utf-8")
    relative = ".venv/bin/catalog-upload-exporter"
    assert cli_command(relative, tmp_path, "/usr/bin/python3", lambda _: None) == relative
    assert cli_command(str(script), tmp_path, "/usr/bin/python3", lambda _: None) == relative
    on_path = cli_command(relative, tmp_path, "/usr/bin/python3", lambda _: str(script))
    assert on_path == "catalog-upload-exporter"
    other = cli_command(relative, tmp_path / "elsewhere", "/usr/bin/python3", lambda _: None)
    assert other == "/usr/bin/python3 -m exporter"  # no such file from there
    module = cli_command("/src/exporter/__main__.py", tmp_path, "/opt/py 3/python", lambda _: None)
    assert module == "'/opt/py 3/python' -m exporter"


@pytest.mark.slow
def test_demo_shows_every_status_and_nonzero_throttle_and_error_counters(tmp_path: Path) -> None:
    """`--demo` needs nothing else and shows all statuses, 429s and errors within a minute;
    its admin API answers at port + 1, and the banner's register, proxy upload and grep
    commands work.
    Started as `make demo` starts it (`.venv/bin/catalog-upload-exporter` from the clone, the
    command not on PATH), its register line runs as printed, by a shell."""
    port = free_port_pair()
    assert VENV_COMMAND.is_file()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": path_without_the_command()}
    started_as = os.path.relpath(VENV_COMMAND, CLONE)
    log = tmp_path / "demo.log"
    proc = Process(
        launch([started_as, "--demo", "--port", str(port)], log, env=env, cwd=CLONE), log
    )
    url = f"http://127.0.0.1:{port}/metrics"
    admin = f"http://127.0.0.1:{port + 1}"
    try:
        wait_http(url)
        wait_for_output(proc, "Stop with Ctrl-C.")  # the banner, printed once both listen
        assert f"http://127.0.0.1:{port}/metrics" in proc.output
        # The banner's `report` example names a config file the demo wrote for its simulator.
        example = re.search(
            r"catalog-upload-exporter report --config (\S+) demo-fatal", proc.output
        )
        assert example is not None, proc.output
        assert "base_url: http://127.0.0.1:" in Path(example.group(1)).read_text()
        (line,) = [s.strip() for s in proc.output.splitlines() if " register " in s]
        register = shlex.split(line)
        assert register[0] == started_as
        assert register[register.index("--url") + 1] == admin

        def run_line(line: str) -> subprocess.CompletedProcess[str]:
            """A banner line run as printed, by a shell, from the clone."""
            return subprocess.run(
                ["bash", "-c", line],
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
                env=env,
                cwd=CLONE,
            )

        result = run_line(line)
        assert result.returncode == 0, result.stderr
        listed = json.loads(http_get(f"{admin}/api/v1/ingestions?limit=1000")[1])["ingestions"]
        tracked = {v["ingestionId"] for v in listed}
        assert register[register.index("register") + 1] in tracked
        assert len(tracked) == len(demo_config("http://127.0.0.1:1", port).ingestions.ids) + 1
        # The banner's upload through the signing proxy, run as printed: the simulator's
        # answer comes back, and its id is tracked by the time it has.
        (upload_line,) = [s.strip() for s in proc.output.splitlines() if "-X POST" in s]
        assert f"http://127.0.0.1:{port + 2}/v1/catalog/upload" in upload_line
        # The demo's API throttles and fails now and then (its chaos): the app gets the API's
        # answer, and the line is run again, as the banner says.
        answers = []
        for _ in range(20):
            uploaded = run_line(upload_line)
            assert uploaded.returncode == 0, uploaded.stderr
            answers.append(uploaded.stdout)
            if '"ingestionId"' in uploaded.stdout:
                break
        upload_id = json.loads(answers[-1])["ingestionId"]
        listed = json.loads(http_get(f"{admin}/api/v1/ingestions?limit=1000")[1])["ingestions"]
        (view,) = [v for v in listed if v["ingestionId"] == upload_id]
        assert view["sources"] == ["proxy"]
        tracked = {v["ingestionId"] for v in listed}
        wanted = {"INQUEUE", "INPROGRESS", "DONE", "CANCELLED", "FATAL", "INVALID", "UNKNOWN"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            samples = parse_exposition(http_get(url)[1])
            shown = {
                dict(labels)["status"]
                for (name, labels), v in samples.items()
                if name == "catalog_uploads" and v > 0
            }
            throttled = value(samples, "catalog_api_throttled_total") or 0
            errors = sum(v for (n, _), v in samples.items() if n == "catalog_api_errors_total")
            if wanted <= shown and throttled > 0 and errors > 0:
                break
            time.sleep(1)
        else:
            pytest.fail(f"demo showed {shown}, throttled={throttled}, errors={errors}")
        exposition = http_get(url)[1]
        assert "_created" not in exposition
        status_lines = [
            line for line in exposition.splitlines() if line.startswith("catalog_upload_status{")
        ]
        grep = banner_command(proc.output, "curl -s")[-2:]  # grep -E PATTERN, after the pipe
        shown_lines = subprocess.run(
            ["grep", *grep], input=exposition, capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert shown_lines == [line for line in status_lines if float(line.rsplit(" ", 1)[1]) == 1]
        assert len(shown_lines) == len(tracked)
    finally:
        assert proc.stop() == 0


def test_readme_counts_the_ids_the_demo_tracks() -> None:
    """The README's quick start states how many ids the demo tracks, as the demo config has it."""
    tracked = len(demo_config("http://127.0.0.1:1", 0).ingestions.ids)
    readme = " ".join(Path("README.md").read_text().split())
    assert f"({tracked} in all)" in readme


def wait_for_output(proc: Process, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.output:
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not printed within {timeout} s; output:\n{proc.output}")
        time.sleep(0.05)


@pytest.mark.slow
def test_register_command_adds_an_id_through_the_admin_api(simulator: str, tmp_path: Path) -> None:
    """`catalog-upload-exporter register ID --url ...` makes a running exporter track the id."""
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path / "c.yaml", simulator, [], port)
    config.write_text(config.read_text().replace("  port: 0", f"  port: {admin_port}"))
    proc = Process.exporter(config)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        wait_http(f"{admin}/healthz")
        result = subprocess.run(
            [*EXPORTER, "register", "demo-done-01", "--url", admin],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["ingestionId"] == "demo-done-01"
        status, body = http_get(f"{admin}/api/v1/ingestions")
        assert status == 200
        assert [v["ingestionId"] for v in json.loads(body)["ingestions"]] == ["demo-done-01"]
        refused = subprocess.run(
            [*EXPORTER, "register", "x" * 300, "--url", admin],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert refused.returncode == 1
        assert "too_long" in refused.stderr
    finally:
        assert proc.stop() == 0


def test_a_port_in_use_exits_1_logging_cannot_listen_before_the_exporter_stops(
    simulator: str, tmp_path: Path
) -> None:
    """Another process on server.port: exit 1, and the log says why before it says stopped."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "c.yaml", simulator, ["demo-done-01"], port)
        result = subprocess.run(
            [*EXPORTER, "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    events = [json.loads(line)["event"] for line in result.stdout.splitlines() if line.strip()]
    assert "cannot_listen" in events, events
    assert "exporter_stopped" in events, events
    assert events.index("cannot_listen") < events.index("exporter_stopped"), events


def test_shutdown_logs_shutting_down_then_admin_stopped_then_exporter_stopped(
    simulator: str, tmp_path: Path
) -> None:
    """SIGTERM: the admin API closes (no new registrations) before the exporter stops."""
    port = free_port()
    config = write_config(tmp_path / "c.yaml", simulator, ["demo-done-01"], port)
    proc = Process.exporter(config)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    proc.wait_for_event("admin_api_listening")
    assert proc.stop() == 0
    events = [str(e["event"]) for e in proc.events()]
    order = ["shutting_down", "admin_api_stopped", "exporter_stopped"]
    assert [e for e in events if e in order] == order, events
