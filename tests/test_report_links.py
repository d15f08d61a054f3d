"""Hostile report links (issue 20, findings 3, 4, 5, 7, 13): the report fetch is a download
from a public https host and nothing else, passes the body on byte for byte, and can neither
be multiplied nor left running by clients that leave.

The hostile link is what the simulator answers as reportDownloadLink (`set_report_link`);
what it points at is a raw TCP server on loopback that records every connection and request
head, so that "nothing was sent there" is checked where it would have arrived."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from exporter.admin import create_admin_app
from exporter.admin_schema import MAX_REPORTS_IN_FLIGHT
from exporter.config import ServerConfig
from exporter.ratelimit import AdaptiveRateLimiter, RateShare
from exporter.report import PublicAddresses, address_problem
from exporter.runtime import app_runner
from exporter.service import REPORT_SHARE
from exporter.simulator import Fault, FaultKind, Simulator
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for
from tests.test_report import SIMULATOR_HOSTS, assert_no_link, run_report, write_config
from tests.virtual_time import VirtualTime

#: What the loopback service behind a hostile link answers, when it answers.
SECRET = b"internal-service-secret-0123"
#: Longest a test waits for an answer that the old code never gave (the link's loop, a hang).
ANSWER_TIMEOUT = 15.0


@dataclass
class Recorder:
    """A raw TCP server on loopback: counts connections (open now and ever) and keeps each
    request head; answers 200 with SECRET, or never (`answers=False`)."""

    answers: bool = True
    heads: list[bytes] = field(default_factory=list)
    opened: int = 0
    open_now: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.open_now += 1
        self._writers.append(writer)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            if self.answers:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\n"
                    + f"Content-Length: {len(SECRET)}\r\nConnection: close\r\n\r\n".encode()
                    + SECRET
                )
                await writer.drain()
            else:
                while await reader.read(1024):  # until the client closes
                    pass
        except ConnectionError:
            pass
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def recorder() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    """Start Recorders: `service = await recorder(answers=False)`; closed at the end."""
    started: list[Recorder] = []

    async def start(**options: Any) -> Recorder:
        service = Recorder(**options)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.close()


async def serve_admin(app: web.Application) -> tuple[str, web.AppRunner]:
    """Serve an admin app on a free loopback port as the exporter does (`app_runner`: no
    aiohttp handler cancellation, which aiohttp's TestServer would turn on); its base URL."""
    runner = app_runner(app, ServerConfig().idle_timeout_seconds)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}", runner


@dataclass
class Admin:
    """A simulator, an exporter tracking up-1 (FATAL) against it, and its admin API at `url`;
    `requests` lists the path of every request the admin API received."""

    sim: Simulator
    running: Any
    url: str
    requests: list[str]

    async def get(self, path: str, *, decompress: bool = True) -> tuple[int, dict[str, str], bytes]:
        """GET `path` on the admin API; fails the test if no answer comes in time."""
        target = aiohttp.client.URL(self.url + path, encoded=True)
        async with aiohttp.ClientSession(auto_decompress=decompress) as session:

            async def exchange() -> tuple[int, dict[str, str], bytes]:
                async with session.get(target) as r:
                    return r.status, dict(r.headers), await r.read()

            return await asyncio.wait_for(exchange(), ANSWER_TIMEOUT)


AdminFactory = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def start_admin(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory
) -> AsyncIterator[AdminFactory]:
    """`admin = await start_admin(**api)`: `api` merged into the exporter's api section (no
    api.report_hosts unless given, as in production); every admin request is recorded."""
    runners: list[web.AppRunner] = []

    async def start(**api: Any) -> Admin:
        sim, url = await start_simulator()
        sim.add_upload("up-1", [("FATAL", math.inf)])
        running = await start_exporter(fast_config(url, ["up-1"], api=api))
        seen: list[str] = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            seen.append(request.path)
            response: web.StreamResponse = await handler(request)
            return response

        app = create_admin_app(running.exporter.tracker, reports=running.exporter.fetch_report)
        app.middlewares.insert(0, record)
        admin_url, runner = await serve_admin(app)
        runners.append(runner)
        return Admin(sim, running, admin_url, seen)

    yield start
    for runner in runners:
        await runner.cleanup()


# -- finding 3: SSRF, and finding 7: userinfo and raw spaces ------------------------------------


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("http://127.0.0.1:{port}/r.csv", "forbidden_scheme"),
        ("https://127.0.0.1:{port}/r.csv", "forbidden_host"),
        ("https://[::ffff:127.0.0.1]:{port}/r.csv", "forbidden_host"),
        ("https://localhost:{port}/r.csv", "forbidden_host"),
    ],
    ids=["http-loopback", "https-loopback", "mapped-ipv6", "name-resolving-to-loopback"],
)
async def test_a_link_to_a_loopback_service_is_refused_before_any_connection(
    start_simulator: SimulatorFactory,
    recorder: Callable[..., Awaitable[Recorder]],
    tmp_path: Path,
    template: str,
    kind: str,
) -> None:
    """Without api.report_hosts, a link to a loopback service (plain http, https, an
    IPv4-mapped address, a name resolving to loopback) is refused: the command exits 3 naming
    the kind, and the service receives no connection at all."""
    service = await recorder()
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.set_report_link("up-1", template.format(port=service.port))
    config = write_config(tmp_path, url, report_hosts=[])
    run = await run_report("--config", str(config), "--timeout", "5", "up-1")
    assert run.code == 3, run.stderr
    assert f"download failed ({kind})" in run.stderr
    assert "api.report_hosts" in run.stderr
    assert SECRET not in run.stdout
    assert service.opened == 0


@pytest.mark.parametrize(
    "link",
    [
        "http://127.0.0.1:{port}/r.csv",
        "https://127.0.0.1:{port}/r.csv",
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://10.1.2.3/r.csv",
        "https://[fe80::1]/r.csv",
        "https://0.0.0.0:{port}/r.csv",
        "https://224.0.0.1/r.csv",
    ],
    ids=["http-loopback", "loopback", "metadata", "private", "link-local-v6", "any", "multicast"],
)
async def test_the_admin_route_refuses_a_link_to_an_internal_address_with_502(
    start_admin: AdminFactory, recorder: Callable[..., Awaitable[Recorder]], link: str
) -> None:
    """The admin route answers 502 report_download_failed naming forbidden_host (or
    forbidden_scheme for plain http) and the reason, at once: no connection is tried, so
    neither the instance metadata service nor a loopback service is reached."""
    service = await recorder()
    admin = await start_admin()
    admin.sim.set_report_link("up-1", link.format(port=service.port))
    status, _, body = await admin.get("/api/v1/ingestions/up-1/report")
    assert status == 502, body
    assert b'"report_download_failed"' in body
    assert b"not fetched" in body or b"plain http, not https" in body
    assert SECRET not in body
    assert service.opened == 0


def test_address_problem_names_every_internal_kind_and_passes_public_ones() -> None:
    """Loopback, link-local, private, unspecified, multicast, reserved and shared addresses,
    and IPv4 ones hidden in IPv6 (mapped, 6to4), each have a reason; public ones have none."""
    refused = {
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "169.254.169.254": "link-local",
        "fe80::1%eth0": "link-local",
        "10.0.0.1": "private",
        "192.168.1.1": "private",
        "fd00::1": "private",
        "0.0.0.0": "unspecified",  # noqa: S104 - an address under test, nothing binds it
        "::": "unspecified",
        "224.0.0.1": "multicast",
        "ff02::1": "multicast",
        "240.0.0.1": "address",  # reserved; Python 3.11 calls it private first
        "100.64.0.1": "address",  # shared (carrier-grade NAT): not global
        "::ffff:127.0.0.1": "loopback",
        "::ffff:169.254.169.254": "link-local",
        "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
    }
    for address, reason in refused.items():
        problem = address_problem(address)
        assert problem is not None and reason in problem, (address, problem)
    for public in ("52.216.8.1", "3.5.140.2", "2600:1f18::1"):
        assert address_problem(public) is None, public


class Answers(AbstractResolver):
    """A resolver that answers the next of `answers` each time it is asked: a DNS server
    that rebinds a name between two lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.answers.pop(0)
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in addresses
        ]

    async def close(self) -> None:
        pass


async def test_each_resolution_the_connector_uses_is_filtered_so_rebinding_gains_nothing() -> None:
    """The resolver the download connects with drops internal addresses from every answer:
    a public answer passes, a rebound loopback one the next time is refused, and a mixed
    answer keeps only its public address (the one connected to)."""
    resolver = PublicAddresses(Answers(["52.216.8.1"], ["127.0.0.1"], ["10.0.0.7", "52.216.8.2"]))
    assert [r["host"] for r in await resolver.resolve("bucket.example", 443)] == ["52.216.8.1"]
    with pytest.raises(OSError, match="no public address"):
        await resolver.resolve("bucket.example", 443)
    assert "127.0.0.1, a loopback address" in resolver.refused
    assert [r["host"] for r in await resolver.resolve("bucket.example", 443)] == ["52.216.8.2"]


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("http://:@127.0.0.1:{port}/e", "forbidden_userinfo"),
        ("http://@127.0.0.1:{port}/e", "forbidden_userinfo"),
        ("http://u:p@127.0.0.1:{port}/e", "forbidden_userinfo"),
        ("http://127.0.0.1:{port}/a b HTTP/1.1\r\nX-Injected: 1\r\n\r\n", "bad_link"),
        ("http://127.0.0.1:{port}/a b", "bad_link"),
        ("ftp://127.0.0.1:{port}/e", "forbidden_scheme"),
    ],
    ids=["empty-userinfo", "empty-user", "userinfo", "header-injection", "raw-space", "ftp"],
)
async def test_userinfo_raw_spaces_and_other_schemes_are_refused_even_for_a_listed_host(
    start_simulator: SimulatorFactory,
    recorder: Callable[..., Awaitable[Recorder]],
    tmp_path: Path,
    template: str,
    kind: str,
) -> None:
    """With the host listed in api.report_hosts, a link with user information (even an empty
    `:@`, which aiohttp sends as `Authorization: Basic Og==`), a raw space or another scheme is
    still refused; the host receives no request, so no Authorization and no raw space."""
    service = await recorder()
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.set_report_link("up-1", template.format(port=service.port))
    run = await run_report("--config", str(write_config(tmp_path, url)), "--timeout", "5", "up-1")
    assert run.code == 3, run.stderr
    assert f"download failed ({kind})" in run.stderr
    assert service.heads == []
    assert service.opened == 0


# -- finding 4: a link to the exporter's own report route ---------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_link_to_the_exporters_own_report_route_is_refused_not_looped(
    start_admin: AdminFactory, scheme: str
) -> None:
    """A link to the admin API's own report route is a loopback link: refused, so the one
    client request is the only one the admin API sees and it is answered 502 at once."""
    admin = await start_admin()
    own = f"{admin.url.replace('http://', f'{scheme}://')}/api/v1/ingestions/up-1/report"
    admin.sim.set_report_link("up-1", own)
    status, _, body = await admin.get("/api/v1/ingestions/up-1/report")
    assert status == 502, body
    assert b"not fetched" in body or b"plain http, not https" in body
    assert admin.requests == ["/api/v1/ingestions/up-1/report"]


async def test_a_self_link_through_a_listed_admin_host_ends_at_the_report_cap(
    start_admin: AdminFactory,
) -> None:
    """Even with loopback listed in api.report_hosts (a test set-up, or a mistake), a link to
    the route itself cannot loop: the chain of nested report requests stops at
    MAX_REPORTS_IN_FLIGHT (the next is answered 429), and the client gets a 502."""
    admin = await start_admin(report_hosts=SIMULATOR_HOSTS)
    admin.sim.set_report_link("up-1", f"{admin.url}/api/v1/ingestions/up-1/report")
    status, _, body = await admin.get("/api/v1/ingestions/up-1/report")
    assert status == 502, body
    assert len(admin.requests) == MAX_REPORTS_IN_FLIGHT + 1


async def _true(value: bool) -> bool:
    return value


# -- finding 5: gzip-encoded reports ------------------------------------------------------------


async def test_a_gzip_encoded_report_reaches_the_admin_client_whole_and_byte_exact(
    start_admin: AdminFactory,
) -> None:
    """A 2 MiB report S3 serves gzip-encoded goes on as it came: the same compressed bytes
    with Content-Encoding: gzip and their own length, so a client inflates all of it (the
    old route sent the compressed length with the inflated body: a short report)."""
    admin = await start_admin(report_hosts=SIMULATOR_HOSTS)
    admin.sim.reports.report_bytes = 2 * 1024 * 1024
    admin.sim.reports.gzip = True
    status, headers, raw = await admin.get("/api/v1/ingestions/up-1/report", decompress=False)
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert raw == admin.sim.reports.encoded_body("up-1")
    assert int(headers["Content-Length"]) == len(raw)
    assert gzip.decompress(raw) == admin.sim.reports.body("up-1")
    status, _, inflated = await admin.get("/api/v1/ingestions/up-1/report")
    assert (status, inflated) == (200, admin.sim.reports.body("up-1"))


async def test_the_admin_size_cap_counts_the_bytes_it_sends(start_admin: AdminFactory) -> None:
    """api.max_report_bytes applies to what the route sends: a gzip report smaller than the
    cap compressed passes however large it inflates; one larger compressed is refused."""
    admin = await start_admin(report_hosts=SIMULATOR_HOSTS, max_report_bytes=64 * 1024)
    admin.sim.reports.gzip = True
    admin.sim.reports.report_bytes = 1024 * 1024  # repetitive rows: about 20 KiB compressed
    status, _, raw = await admin.get("/api/v1/ingestions/up-1/report", decompress=False)
    assert status == 200
    assert len(raw) <= 64 * 1024 < len(admin.sim.reports.body("up-1"))
    assert gzip.decompress(raw) == admin.sim.reports.body("up-1")
    admin.sim.reports.gzip = False
    status, _, body = await admin.get("/api/v1/ingestions/up-1/report")
    assert (status, b"report_too_large" in body) == (502, True)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_the_command_writes_a_gzip_report_inflated_and_caps_what_it_writes(
    start_simulator: SimulatorFactory, tmp_path: Path, chunked: bool
) -> None:
    """The command writes the report itself, inflated, in full; api.max_report_bytes counts
    the inflated bytes it writes (exit 4 when they pass it), not the compressed length."""
    sim, url = await start_simulator(report_bytes=256 * 1024, report_chunked=chunked)
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.reports.gzip = True
    assert len(sim.reports.encoded_body("up-1")) < 64 * 1024
    run = await run_report("--config", str(write_config(tmp_path, url)), "up-1")
    assert run.code == 0, run.stderr
    assert run.stdout == sim.reports.body("up-1")
    capped = write_config(tmp_path, url, max_report_bytes=64 * 1024)
    run = await run_report("--config", str(capped), "up-1")
    assert run.code == 4, run.stderr
    assert run.stdout == b""
    assert_no_link(run.stderr)


# -- finding 13 (and 4): the cap, clients that leave, the budget share ---------------------------


async def test_report_requests_past_the_cap_get_429_and_leaving_clients_cancel_downloads(
    start_admin: AdminFactory, recorder: Callable[..., Awaitable[Recorder]]
) -> None:
    """Against a report host that never answers: MAX_REPORTS_IN_FLIGHT requests hold a
    download each, the next is answered 429 with Retry-After at once, and when their clients
    leave every download is closed (none left open for the download timeout)."""
    never = await recorder(answers=False)
    admin = await start_admin(report_hosts=SIMULATOR_HOSTS)
    admin.sim.set_report_link("up-1", f"http://127.0.0.1:{never.port}/r.csv")
    clients = [
        asyncio.create_task(admin.get("/api/v1/ingestions/up-1/report"))
        for _ in range(MAX_REPORTS_IN_FLIGHT)
    ]
    await wait_for(lambda: _true(never.open_now == MAX_REPORTS_IN_FLIGHT), timeout=ANSWER_TIMEOUT)
    status, headers, body = await admin.get("/api/v1/ingestions/up-1/report")
    assert (status, headers.get("Retry-After")) == (429, "2"), body
    assert b'"too_many_reports"' in body
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await wait_for(lambda: _true(never.open_now == 0), timeout=ANSWER_TIMEOUT)
    assert never.opened == MAX_REPORTS_IN_FLIGHT
    # The slots are free again: a new request is served (here: held) rather than refused.
    again = asyncio.create_task(admin.get("/api/v1/ingestions/up-1/report"))
    await wait_for(lambda: _true(never.open_now == 1), timeout=ANSWER_TIMEOUT)
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)
    await wait_for(lambda: _true(never.open_now == 0), timeout=ANSWER_TIMEOUT)


async def test_report_link_polls_get_their_share_of_the_budget_and_polls_keep_the_rest() -> None:
    """With 100 report fetches waiting and polls asking for every token, over 60 virtual
    seconds at 5 requests/s the reports get at most REPORT_SHARE of the budget (plus a burst
    of one) and the polls at least the rest; the total never passes the limit."""
    time = VirtualTime()
    limiter = AdaptiveRateLimiter(5.0, clock=time.clock, sleep=time.sleep)
    share = RateShare(limiter, REPORT_SHARE, clock=time.clock, sleep=time.sleep)
    start = time.now
    taken = {"poll": 0, "report": 0}

    async def poll_forever() -> None:
        while True:
            await limiter.acquire()
            taken["poll"] += 1

    async def report() -> None:
        await share.acquire()
        taken["report"] += 1

    tasks = [asyncio.create_task(report()) for _ in range(100)]
    tasks.append(asyncio.create_task(poll_forever()))
    await time.run_until(lambda: time.now - start >= 60, limit=61)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert taken["report"] <= 5.0 * REPORT_SHARE * 60 + 1
    assert taken["poll"] >= 5.0 * (1 - REPORT_SHARE) * 60 - 1
    assert sum(taken.values()) <= 5.0 * 60 + 1


@pytest.mark.slow
async def test_polls_hold_their_rate_under_100_abandoned_report_requests(
    start_simulator: SimulatorFactory,
    start_exporter: ExporterFactory,
    recorder: Callable[..., Awaitable[Recorder]],
) -> None:
    """At 5 requests/s, 5 uploads polled every 2 s need 2.5 polls/s. Every 2 s for 10 s, 100
    report requests at once against a host that never answers, each abandoned after 1 s:
    the polls keep at least half of what they need (the old route queued every report
    poll ahead of them), report link polls stay within their share, and no download is left
    open afterwards."""
    never = await recorder(answers=False)
    sim, url = await start_simulator()
    polled = [f"poll-{n}" for n in range(5)]
    for ingestion_id in polled:
        sim.add_upload(ingestion_id, [("INPROGRESS", math.inf)])
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.set_report_link("up-1", f"http://127.0.0.1:{never.port}/r.csv")
    config = fast_config(
        url,
        [*polled, "up-1"],
        api={"max_requests_per_second": 5, "report_hosts": SIMULATOR_HOSTS},
        polling={"interval_seconds": 2, "jitter_ratio": 0},
    )
    running = await start_exporter(config)
    app = create_admin_app(running.exporter.tracker, reports=running.exporter.fetch_report)
    admin_url, runner = await serve_admin(app)
    target = aiohttp.client.URL(f"{admin_url}/api/v1/ingestions/up-1/report")
    await asyncio.sleep(3)  # polling settled first

    async def abandoned(session: aiohttp.ClientSession) -> None:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(1.0), session.get(target) as response:
                await response.read()

    def polls() -> int:
        return sum(sim.count(ingestion_id=i) for i in polled)

    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            before, started, links = polls(), loop.time(), sim.count(ingestion_id="up-1")
            for _ in range(5):
                await asyncio.gather(*(abandoned(session) for _ in range(100)))
                await asyncio.sleep(1.0)
            seconds = loop.time() - started
            rate = (polls() - before) / seconds
            link_polls = sim.count(ingestion_id="up-1") - links
            open_after = never.open_now
            print(
                f"\npolls/s under abandoned report requests: {rate:.2f} (2.5 needed); report "
                f"link polls: {link_polls} in {seconds:.1f} s; downloads open: {open_after}"
            )
        await wait_for(lambda: _true(never.open_now == 0), timeout=ANSWER_TIMEOUT)
    finally:
        await runner.cleanup()
    assert rate >= 1.25
    assert link_polls <= 5 * REPORT_SHARE * seconds + MAX_REPORTS_IN_FLIGHT


# -- issue 22: a 429 to a report link poll reaches the adaptive limiter -------------------------


@pytest.mark.parametrize("path", ["poll", "report"])
async def test_a_429_on_the_report_route_slows_the_limiter_as_a_polls_429_does(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, path: str
) -> None:
    """One 429 from the API, to a poll or to the admin report route's link poll, halves the
    rate in force (catalog_api_rate_limit_requests_per_second): the route takes the limiter's
    tokens, so the API's throttling of it must slow the limiter too (it did not)."""
    sim, url = await start_simulator()
    sim.add_upload("up-1", [("FATAL", math.inf)])
    sim.add_upload("busy", [("INPROGRESS", math.inf)])
    config = fast_config(url, ["up-1", "busy"], api={"report_hosts": SIMULATOR_HOSTS})
    running = await start_exporter(config)
    await wait_for(running.status_is("up-1", "FATAL"))
    app = create_admin_app(running.exporter.tracker, reports=running.exporter.fetch_report)
    admin_url, runner = await serve_admin(app)
    try:
        rate = "catalog_api_rate_limit_requests_per_second"
        assert (await running.scrape())[(rate, frozenset())] == 200
        throttled = "up-1" if path == "report" else "busy"
        sim.inject(Fault(FaultKind.THROTTLE, retry_after=0.1), ingestion_id=throttled, count=1)
        if path == "report":
            target = aiohttp.client.URL(f"{admin_url}/api/v1/ingestions/up-1/report")
            async with aiohttp.ClientSession() as session, session.get(target) as response:
                assert response.status == 502, await response.text()
                assert b'"api_error"' in await response.read()

        async def slowed() -> bool:
            # Halved to 100/s, then climbing back at 200/30 per second: under 150 for 7 s.
            return (await running.scrape())[(rate, frozenset())] < 150

        await wait_for(slowed, timeout=5)
        assert sim.count(ingestion_id=throttled, status=429) == 1
    finally:
        await runner.cleanup()
