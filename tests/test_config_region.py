"""The minimal config, as the README states it: a base URL and, for sigv4, a region from the
file, from an API Gateway host name, or from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("base_url", "region"),
    [
        ("https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/prod", "eu-west-1"),
        ("https://a1b2c3d4e5.execute-api.cn-north-1.amazonaws.com.cn/prod", "cn-north-1"),
        ("https://a1b2c3d4e5-vpce-0abc.execute-api.us-east-2.vpce.amazonaws.com/v1", "us-east-2"),
    ],
)
def test_a_base_url_on_an_execute_api_host_gives_sigv4_its_region(
    base_url: str, region: str
) -> None:
    """With only api.base_url in the file and no AWS variable, an API Gateway host name's
    region is the one sigv4 signs for."""
    config = parse_config({"api": {"base_url": base_url}}, environ={})
    assert (config.api.auth.type, config.api.auth.region) == ("sigv4", region)


def test_the_files_region_wins_and_the_host_beats_the_environment() -> None:
    """api.auth.region, when set, is kept; else the host's region is taken before AWS_REGION
    (API Gateway checks the signature against its own region)."""
    base_url = "https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/prod"
    environ = {"AWS_REGION": "us-west-2"}
    in_file = {"api": {"base_url": base_url, "auth": {"region": "us-east-1"}}}
    assert parse_config(in_file, environ=environ).api.auth.region == "us-east-1"
    from_host = parse_config({"api": {"base_url": base_url}}, environ=environ)
    assert from_host.api.auth.region == "eu-west-1"


def test_bearer_auth_takes_no_region_from_the_host() -> None:
    """Only sigv4 needs a region: a bearer config on an execute-api host gets none."""
    document = {
        "api": {
            "base_url": "https://a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com/prod",
            "auth": {"type": "bearer", "token_env": "CATALOG_TOKEN"},
        }
    }
    config = parse_config(document, environ={"CATALOG_TOKEN": "t0ken"})
    assert config.api.auth.region == ""


def test_a_minimal_config_elsewhere_needs_a_region_and_the_readme_says_so() -> None:
    """Another host with no region anywhere is refused naming api.auth.region; AWS_REGION
    alone makes it valid; the README names all three sources of the region."""
    document = {"api": {"base_url": "https://catalog.example.com/prod"}}
    with pytest.raises(ConfigError, match=r"api\.auth\.region: required with type: sigv4"):
        parse_config(document, environ={})
    assert parse_config(document, environ={"AWS_REGION": "us-east-1"}).api.auth.region
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "only `api.base_url` is required" not in readme
    for source in ("`api.auth.region`", "`AWS_REGION`", "execute-api.<region>.amazonaws.com"):
        assert source in readme, source
