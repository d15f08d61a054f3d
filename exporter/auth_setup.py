"""The configured authentication: `api.auth` turned into a `RequestAuth`.

It sits between `config` (which imports `auth` for its choices) and `auth` (which knows no
config), so that the running exporter (`service`) and the `report` subcommand build the same
authentication from the same config without one importing the other. Tests pass their own
`AuthFactory` instead.
"""

from __future__ import annotations

from collections.abc import Callable

from exporter.auth import RequestAuth, create_auth
from exporter.config import AuthConfig

__all__ = ["AuthFactory", "auth_from_config"]

AuthFactory = Callable[[AuthConfig], RequestAuth]


def auth_from_config(auth: AuthConfig) -> RequestAuth:
    """The production way to authenticate: exactly what the config says."""
    return create_auth(
        type=auth.type,
        region=auth.region,
        role_arn=auth.role_arn,
        token_file=auth.token_file,
        token_env=auth.token_env,
        header=auth.header,
        scheme=auth.scheme,
    )
