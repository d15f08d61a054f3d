"""Request authentication, checked for real by the simulator over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import botocore.session
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.credentials import Credentials, ReadOnlyCredentials

from exporter.auth import (
    TOKEN_RECHECK_SECONDS,
    AuthUnavailable,
    BearerAuth,
    NoAuth,
    RequestAuth,
    SigV4Auth,
    create_auth,
    silence_botocore_debug,
)
from exporter.simulator import (
    API_PATH,
    TEST_ACCESS_KEY_ID,
    TEST_REGION,
    TEST_SECRET_ACCESS_KEY,
    Simulator,
)
from tests.conftest import SimulatorFactory

TEST_CREDENTIALS = Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
BODY = json.dumps({"ingestionId": "up-1"}).encode()


@pytest.fixture
def serve(start_simulator: SimulatorFactory) -> Callable[..., Any]:
    """Serve a simulator with upload "up-1" on loopback: `sim, url = await serve(**options)`."""

    async def start(**options: Any) -> tuple[Simulator, str]:
        sim, url = await start_simulator(**options)
        sim.add_upload("up-1", [("INPROGRESS", 0)])
        return sim, url

    return start


async def call(
    auth: RequestAuth, url: str, *, sign_body: bytes = BODY, send_body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """Authenticate `sign_body`, send `send_body` (the same by default); (status, JSON)."""
    headers = {"Content-Type": "application/json"}
    headers.update(await auth.headers("POST", url, sign_body, headers))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=sign_body if send_body is None else send_body, headers=headers
        ) as response,
    ):
        return response.status, await response.json(content_type=None)


@pytest.fixture
def empty_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An environment where botocore's default chain finds nothing, quickly."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class CountingCredentials(Credentials):
    """Fixed credentials that count freezes and remember the threads they ran on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.freezes = 0
        self.threads: set[int] = set()

    def get_frozen_credentials(self) -> ReadOnlyCredentials:
        self.freezes += 1
        self.threads.add(threading.get_ident())
        return super().get_frozen_credentials()


async def test_sigv4_signed_requests_are_accepted_by_the_simulator(serve):
    """A request signed with the simulator's test key passes its real signature check."""
    sim, url = await serve(auth="sigv4")
    auth = SigV4Auth(region=TEST_REGION, credentials=TEST_CREDENTIALS)
    status, payload = await call(auth, url + API_PATH)
    assert status == 200
    assert payload["processingStatus"] == "INPROGRESS"
    assert sim.count(auth_ok=True) == 1


async def test_sigv4_with_a_session_token_and_a_stage_prefix_is_accepted(serve):
    """Temporary credentials add X-Amz-Security-Token, and a /prod prefix is signed too."""
    _, url = await serve(auth="sigv4")
    creds = Credentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, token="session-token-xyz")
    auth = SigV4Auth(region=TEST_REGION, credentials=creds)
    headers = await auth.headers("POST", url + "/prod" + API_PATH, BODY, {})
    assert headers["X-Amz-Security-Token"] == "session-token-xyz"
    assert "x-amz-security-token" in headers["Authorization"]
    status, _ = await call(auth, url + "/prod" + API_PATH)
    assert status == 200


async def test_sigv4_headers_are_only_the_ones_to_add():
    """Without a session token: Authorization and X-Amz-Date, signing host and content-type."""
    auth = SigV4Auth(region=TEST_REGION, credentials=TEST_CREDENTIALS)
    headers = await auth.headers(
        "POST", "https://api.example.com/v1", BODY, {"Content-Type": "application/json"}
    )
    assert set(headers) == {"Authorization", "X-Amz-Date"}
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={TEST_ACCESS_KEY_ID}/")
    assert f"/{TEST_REGION}/execute-api/aws4_request" in headers["Authorization"]
    assert "SignedHeaders=content-type;host;x-amz-date," in headers["Authorization"]


@pytest.mark.parametrize(
    ("credentials", "region", "message"),
    [
        (Credentials(TEST_ACCESS_KEY_ID, "not-the-secret"), TEST_REGION, "does not match"),
        (Credentials("AKIDUNKNOWNEXAMPLE", TEST_SECRET_ACCESS_KEY), TEST_REGION, "invalid"),
        (TEST_CREDENTIALS, "eu-west-1", "region"),
    ],
    ids=["wrong-secret", "unknown-access-key", "wrong-region"],
)
async def test_sigv4_with_bad_credentials_is_rejected_with_403(serve, credentials, region, message):
    """The simulator refuses a wrong secret, an unknown key and a wrong region."""
    sim, url = await serve(auth="sigv4")
    status, payload = await call(SigV4Auth(region=region, credentials=credentials), url + API_PATH)
    assert status == 403
    assert message in payload["message"]
    assert sim.count(auth_ok=False) == 1


async def test_a_tampered_body_is_rejected_with_403(serve):
    """The signature covers the exact body bytes."""
    _, url = await serve(auth="sigv4")
    auth = SigV4Auth(region=TEST_REGION, credentials=TEST_CREDENTIALS)
    tampered = json.dumps({"ingestionId": "up-2"}).encode()
    status, payload = await call(auth, url + API_PATH, send_body=tampered)
    assert status == 403
    assert "signature we calculated does not match" in payload["message"]


async def test_a_signature_for_another_path_is_rejected_with_403(serve):
    """The signature covers the URL path: one made for /prod does not fit /v1."""
    _, url = await serve(auth="sigv4")
    auth = SigV4Auth(region=TEST_REGION, credentials=TEST_CREDENTIALS)
    headers = {"Content-Type": "application/json"}
    headers.update(await auth.headers("POST", url + "/prod" + API_PATH, BODY, headers))
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + API_PATH, data=BODY, headers=headers) as response,
    ):
        assert response.status == 403


async def test_a_signature_from_a_skewed_clock_is_rejected_with_403(serve):
    """X-Amz-Date more than five minutes from the server's clock is refused."""
    _, url = await serve(auth="sigv4", wall_clock=lambda: time.time() + 600)
    auth = SigV4Auth(region=TEST_REGION, credentials=TEST_CREDENTIALS)
    status, payload = await call(auth, url + API_PATH)
    assert status == 403
    assert "Signature expired" in payload["message"]


async def test_an_unsigned_request_in_sigv4_mode_is_rejected_with_403(serve):
    """No Authorization header at all gets API Gateway's Missing Authentication Token."""
    _, url = await serve(auth="sigv4")
    status, payload = await call(NoAuth(), url + API_PATH)
    assert status == 403
    assert payload == {"message": "Missing Authentication Token"}


async def test_bearer_tokens_are_accepted_and_a_wrong_one_gets_401(serve, tmp_path):
    """The right bearer token passes; a wrong or missing one is 401 Unauthorized."""
    sim, url = await serve(auth="bearer", tokens=["good-token"])
    good = tmp_path / "good"
    good.write_text("good-token\n")
    bad = tmp_path / "bad"
    bad.write_text("bad-token")
    assert (await call(BearerAuth(token_file=str(good)), url + API_PATH))[0] == 200
    assert await call(BearerAuth(token_file=str(bad)), url + API_PATH) == (
        401,
        {"message": "Unauthorized"},
    )
    assert (await call(NoAuth(), url + API_PATH))[0] == 401
    assert sim.count(auth_ok=False) == 2


async def test_bearer_auth_picks_up_a_rotated_token_file(serve, tmp_path):
    """Replacing the token file atomically makes requests carry the new token from the next
    check on, at most TOKEN_RECHECK_SECONDS later."""
    sim, url = await serve(auth="bearer", tokens=["token-one"])
    path = tmp_path / "token"
    path.write_text("token-one")
    now = [100.0]
    auth = BearerAuth(token_file=str(path), clock=lambda: now[0])
    assert await auth.headers("POST", url, BODY, {}) == {"Authorization": "Bearer token-one"}
    assert (await call(auth, url + API_PATH))[0] == 200

    staged = tmp_path / "token.new"
    staged.write_text("token-two\n")
    os.replace(staged, path)
    sim.set_tokens(["token-two"])
    now[0] += TOKEN_RECHECK_SECONDS
    assert await auth.headers("POST", url, BODY, {}) == {"Authorization": "Bearer token-two"}
    assert (await call(auth, url + API_PATH))[0] == 200


async def test_bearer_auth_follows_a_kubernetes_style_symlink_swap(tmp_path):
    """A secret mounted as token -> ..data/token is re-read when ..data is re-pointed."""
    for name, token in (("v1", "first"), ("v2", "second")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "token").write_text(token)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "token").symlink_to("..data/token")
    now = [100.0]
    auth = BearerAuth(
        token_file=str(tmp_path / "token"), header="X-Api-Token", scheme="", clock=lambda: now[0]
    )
    assert await auth.headers("POST", "http://x", b"", {}) == {"X-Api-Token": "first"}
    (tmp_path / "..data.tmp").symlink_to("v2")
    os.replace(tmp_path / "..data.tmp", tmp_path / "..data")
    now[0] += TOKEN_RECHECK_SECONDS
    assert await auth.headers("POST", "http://x", b"", {}) == {"X-Api-Token": "second"}


async def test_the_token_file_is_checked_at_most_once_per_recheck_interval(tmp_path):
    """Within TOKEN_RECHECK_SECONDS of a good read the file is not looked at (not even
    stat()ed, so a vanished file goes unnoticed); after it, a change or a loss shows."""
    path = tmp_path / "token"
    path.write_text("first")
    now = [100.0]
    auth = BearerAuth(token_file=str(path), clock=lambda: now[0])
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Bearer first"}
    path.write_text("second-and-longer")
    now[0] = 100.0 + TOKEN_RECHECK_SECONDS * 0.9
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Bearer first"}
    path.unlink()
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Bearer first"}
    now[0] = 100.0 + TOKEN_RECHECK_SECONDS
    with pytest.raises(AuthUnavailable):
        await auth.headers("POST", "http://x", b"", {})
    path.write_text("third")
    with pytest.raises(AuthUnavailable):  # a problem is kept for the interval too
        await auth.headers("POST", "http://x", b"", {})
    now[0] += TOKEN_RECHECK_SECONDS
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Bearer third"}


@pytest.mark.parametrize("content", [None, "", "  \n", "half\nsecret-half"], ids=repr)
async def test_an_unusable_token_file_raises_auth_unavailable_naming_the_path(tmp_path, content):
    """Missing, empty or multi-line token files fail with the path and never the content."""
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuthUnavailable) as raised:
        await BearerAuth(token_file=str(path)).headers("POST", "http://x", b"", {})
    assert str(path) in str(raised.value)
    if content and content.strip():
        assert "secret-half" not in str(raised.value)


async def test_a_bad_token_file_is_retried_once_fixed(tmp_path):
    """A bad file is kept for the recheck interval like a good one; the first check after it
    reads the fixed file."""
    path = tmp_path / "token"
    path.write_text("")
    now = [100.0]
    auth = BearerAuth(token_file=str(path), clock=lambda: now[0])
    with pytest.raises(AuthUnavailable):
        await auth.headers("POST", "http://x", b"", {})
    path.write_text("now-set")
    now[0] += TOKEN_RECHECK_SECONDS
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Bearer now-set"}


async def test_bearer_auth_reads_a_token_from_the_environment():
    """token_env reads the variable on each call; unset is AuthUnavailable naming it."""
    environ = {"CATALOG_TOKEN": " env-token "}
    auth = BearerAuth(token_env="CATALOG_TOKEN", scheme="Token", environ=environ)
    assert await auth.headers("POST", "http://x", b"", {}) == {"Authorization": "Token env-token"}
    del environ["CATALOG_TOKEN"]
    with pytest.raises(AuthUnavailable, match="CATALOG_TOKEN"):
        await auth.headers("POST", "http://x", b"", {})


@pytest.mark.usefixtures("empty_aws_env")
async def test_sigv4_without_credentials_in_the_chain_raises_auth_unavailable():
    """An empty default chain is AuthUnavailable, not a crash or an unsigned request."""
    auth = SigV4Auth(region=TEST_REGION, session=botocore.session.Session())
    with pytest.raises(AuthUnavailable, match="no AWS credentials found"):
        await auth.headers("POST", "https://api.example.com/v1", BODY, {})


async def test_no_secret_ever_appears_in_an_auth_unavailable_message(empty_aws_env, monkeypatch):
    """A secret half of a key pair in the environment is not echoed in the error."""
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    auth = SigV4Auth(region=TEST_REGION, role_arn="arn:aws:iam::123456789012:role/x")
    with pytest.raises(AuthUnavailable) as raised:
        await auth.headers("POST", "https://api.example.com/v1", BODY, {})
    assert secret not in str(raised.value)
    assert "Signature" not in str(raised.value)


async def test_sigv4_uses_credentials_from_environment_variables(empty_aws_env, monkeypatch, serve):
    """AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are found through the default chain."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-session-token")
    _, url = await serve(auth="sigv4")
    auth = create_auth(type="sigv4", region=TEST_REGION)
    headers = await auth.headers("POST", url + API_PATH, BODY, {})
    assert headers["X-Amz-Security-Token"] == "env-session-token"
    assert (await call(auth, url + API_PATH))[0] == 200


async def test_sigv4_assumes_the_configured_role_and_signs_with_its_credentials(
    empty_aws_env, monkeypatch, serve
):
    """With role_arn, botocore's AssumeRole (here against a fake STS) supplies the keys."""
    calls: list[dict[str, str]] = []

    async def assume_role(request: web.Request) -> web.Response:
        calls.append({k: str(v) for k, v in (await request.post()).items()})
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        return web.Response(
            content_type="text/xml",
            text=f"""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleResult>
    <Credentials>
      <AccessKeyId>ASIAASSUMEDEXAMPLE</AccessKeyId>
      <SecretAccessKey>assumed/secret</SecretAccessKey>
      <SessionToken>assumed-session-token</SessionToken>
      <Expiration>{expires}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/reader/catalog-upload-exporter</Arn>
      <AssumedRoleId>AROAEXAMPLE:catalog-upload-exporter</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleResult>
  <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata>
</AssumeRoleResponse>""",
        )

    sts_app = web.Application()
    sts_app.router.add_post("/", assume_role)
    sts = TestServer(sts_app, host="127.0.0.1")
    await sts.start_server()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDBASEEXAMPLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "base/secret")
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", str(sts.make_url("/")))
        _, url = await serve(auth="sigv4", credentials={"ASIAASSUMEDEXAMPLE": "assumed/secret"})
        role = "arn:aws:iam::123456789012:role/reader"
        auth = SigV4Auth(region=TEST_REGION, role_arn=role)
        assert (await call(auth, url + API_PATH))[0] == 200
        assert (await call(auth, url + API_PATH))[0] == 200
    finally:
        await sts.close()
    assert len(calls) == 1
    assert calls[0]["Action"] == "AssumeRole"
    assert calls[0]["RoleArn"] == role
    assert calls[0]["RoleSessionName"] == "catalog-upload-exporter"


async def test_concurrent_callers_share_one_credential_fetch_off_the_event_loop():
    """Ten concurrent signings freeze the credentials once, in a worker thread."""
    creds = CountingCredentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
    auth = SigV4Auth(region=TEST_REGION, credentials=creds)
    await asyncio.gather(
        *(auth.headers("POST", "https://a.example/v1", BODY, {}) for _ in range(10))
    )
    assert creds.freezes == 1
    assert threading.get_ident() not in creds.threads


async def test_credentials_are_fetched_again_after_the_refresh_interval():
    """With refresh_interval=0 each signing asks botocore for fresh credentials."""
    creds = CountingCredentials(TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY)
    auth = SigV4Auth(region=TEST_REGION, credentials=creds, refresh_interval=0)
    for _ in range(3):
        await auth.headers("POST", "https://a.example/v1", BODY, {})
    assert creds.freezes == 3


async def test_create_auth_builds_each_type(tmp_path):
    """create_auth maps the config's type to an authenticator and refuses unknown types."""
    token = tmp_path / "token"
    token.write_text("t")
    assert isinstance(create_auth(type="none"), NoAuth)
    assert isinstance(create_auth(type="bearer", token_file=str(token)), BearerAuth)
    signer = create_auth(type="sigv4", region=TEST_REGION, credentials=TEST_CREDENTIALS)
    assert isinstance(signer, SigV4Auth)
    assert await create_auth(type="none").headers("POST", "http://x", b"", {}) == {}
    with pytest.raises(ValueError, match="unknown auth type"):
        create_auth(type="basic")


def test_silence_botocore_debug_keeps_signatures_out_of_logs():
    """botocore (and so botocore.auth, which logs signatures) is raised to WARNING."""
    logger = logging.getLogger("botocore")
    before = logger.level
    try:
        logger.setLevel(logging.DEBUG)
        silence_botocore_debug()
        assert logger.level == logging.WARNING
        assert not logging.getLogger("botocore.auth").isEnabledFor(logging.DEBUG)
    finally:
        logger.setLevel(before)
