"""Supabase for processors: settings from the environment (INTEROP §5) and a PostgREST client.

The processors only use Supabase's REST API (table reads and writes, `rpc`), so they talk to
it through `postgrest`, the PostgREST SDK that supabase-py's `.table()` and `.rpc()` delegate
to, and leave out the rest of supabase-py (auth, realtime, storage, functions), which cost
memory and was never called. `make_client` sends the requests supabase-py sent, header for
header, for an API key without a user session.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from postgrest import AsyncPostgrestClient
from postgrest import __version__ as postgrest_version
from yarl import URL

from worker.errors import ConfigError

URL_VARIABLES = ("EXPO_PUBLIC_SUPABASE_URL", "SUPABASE_URL")
# In order of preference: only the service role key sees every `users` row past RLS.
KEY_VARIABLES = ("SUPABASE_SERVICE_ROLE_KEY", "EXPO_PUBLIC_SUPABASE_ANON_KEY", "SUPABASE_ANON_KEY")
DEFAULT_TIMEOUT_S = 10.0
SCHEMA = "public"  # sent as Accept-Profile / Content-Profile

# supabase-py's X-Client-Info (its DEFAULT_HEADERS), kept so Supabase sees the same client as
# before. supabase-py and postgrest are released together under one version (supabase==X pins
# postgrest==X), so postgrest's version is the one supabase-py would report.
CLIENT_INFO = (
    f"supabase-py/{postgrest_version}"
    f"; platform={platform.system()}"
    f"; platform-version={platform.release()}"
    f"; runtime=python"
    f"; runtime-version={platform.python_version()}"
)


@dataclass(frozen=True)
class SupabaseSettings:
    url: str
    key: str = field(repr=False)
    url_variable: str = URL_VARIABLES[-1]
    key_variable: str = KEY_VARIABLES[0]
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def uses_service_role(self) -> bool:
        return self.key_variable == KEY_VARIABLES[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SupabaseSettings | None:
        """The settings, or None when neither a URL nor a key is set (Supabase not configured).

        Half a configuration is a mistake, not a choice: ConfigError names what is missing.
        """
        url, url_variable = _first(env, URL_VARIABLES)
        key, key_variable = _first(env, KEY_VARIABLES)
        if not url and not key:
            return None
        if not url:
            raise ConfigError(
                URL_VARIABLES[-1],
                f"{key_variable} is set but no Supabase URL: set {' or '.join(URL_VARIABLES)}",
            )
        if not key:
            raise ConfigError(
                KEY_VARIABLES[0],
                f"{url_variable} is set but no Supabase key: set {' or '.join(KEY_VARIABLES)}",
            )
        if not re.match(r"^https?://\S+$", url):
            raise ConfigError(url_variable, f"must be an http(s) URL, got {url!r}")
        return cls(url, key, url_variable, key_variable)


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str]:
    for name in names:
        if value := env.get(name, "").strip():
            return value, name
    return "", ""


def rest_url(url: str) -> str:
    """`<project URL>/rest/v1`, joined the way supabase-py joins it."""
    return str((URL(url) if url.endswith("/") else URL(url + "/")).joinpath("rest", "v1"))


def request_headers(key: str) -> dict[str, str]:
    """supabase-py's headers for PostgREST and Storage with an API key (no user session, so
    the key is also the bearer token); the PostgREST client adds the schema headers."""
    return {"X-Client-Info": CLIENT_INFO, "apiKey": key, "Authorization": f"Bearer {key}"}


def make_client(settings: SupabaseSettings) -> tuple[AsyncPostgrestClient, httpx.AsyncClient]:
    """The PostgREST client and the HTTP client it runs on (the caller closes the latter).

    Our own httpx client carries the timeout (postgrest's `timeout` argument is deprecated)
    and gives the processor one thing to close at shutdown. The constructor makes no request.
    """
    http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=True)
    client = AsyncPostgrestClient(
        rest_url(settings.url),
        schema=SCHEMA,
        headers=request_headers(settings.key),
        http_client=http,
    )
    return client, http
