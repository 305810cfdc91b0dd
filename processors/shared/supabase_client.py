"""Supabase for processors: settings from the environment (INTEROP §5) and the async client."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
from supabase import AsyncClient, AsyncClientOptions

from worker.errors import ConfigError

URL_VARIABLES = ("EXPO_PUBLIC_SUPABASE_URL", "SUPABASE_URL")
# In order of preference: only the service role key sees every `users` row past RLS.
KEY_VARIABLES = ("SUPABASE_SERVICE_ROLE_KEY", "EXPO_PUBLIC_SUPABASE_ANON_KEY", "SUPABASE_ANON_KEY")
DEFAULT_TIMEOUT_S = 10.0


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


def make_client(settings: SupabaseSettings) -> tuple[AsyncClient, httpx.AsyncClient]:
    """The supabase async client and the HTTP client it runs on (the caller closes the latter).

    Our own httpx client carries the timeout (postgrest's `timeout` argument is deprecated)
    and gives the processor one thing to close at shutdown. The constructor makes no request.
    """
    http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=True)
    options = AsyncClientOptions(
        httpx_client=http,
        auto_refresh_token=False,  # a service key, never a user session
        persist_session=False,
    )
    return AsyncClient(settings.url, settings.key, options), http
