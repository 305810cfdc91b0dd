"""Supabase Storage for processors: read a user's upload, write a generated file.

Through `storage3`, the Storage SDK supabase-py's `.storage` is (same release as `postgrest`),
on an httpx client of ours (timeout, one thing to close). Errors come out already classified
for the runtime, so a processor needs no Storage knowledge of its own:

    object missing (404), bad bucket or path (400)  → PermanentJobError naming bucket/path
    401 / 403                                       → PermanentJobError naming the key variable
    larger than the caller's limit                  → PermanentJobError naming the limit
    429, 5xx, timeouts, connection errors           → RetryableJobError

A download asks for the object's size first (`info`), so an oversized file is refused without
being read into memory; the bytes read are checked again (the object may change in between).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from storage3 import AsyncStorageClient
from storage3.exceptions import StorageApiError

from processors.shared.supabase_client import (
    KEY_VARIABLES,
    URL_VARIABLES,
    SupabaseSettings,
    request_headers,
)
from worker.errors import JobError, PermanentJobError, RetryableJobError

DEFAULT_TIMEOUT_S = 30.0  # uploads of a few MB of audio
MB = 1024 * 1024  # sizes in messages are in MiB, as the providers' limits mean them


class SupabaseStorage:
    def __init__(self, settings: SupabaseSettings, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.settings = settings
        self.base_url = storage_url(settings.url)
        headers = request_headers(settings.key)
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s, follow_redirects=True)
        self.client = AsyncStorageClient(self.base_url + "/", headers, http_client=self._http)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SupabaseStorage | None:
        """The client, or None when Supabase is not configured (ConfigError when half is)."""
        settings = SupabaseSettings.from_env(env)
        return None if settings is None else cls(settings)

    async def download(self, bucket: str, path: str, max_bytes: int, what: str = "file") -> bytes:
        """The object's bytes; refused (permanently) above `max_bytes`, before reading it."""
        where = f"{bucket}/{path}"
        files = self.client.from_(bucket)
        try:
            info = await files.info(path)
            size = _size_of(info)
            if size is not None and size > max_bytes:
                raise too_large(what, where, size, max_bytes)
            data = await files.download(path)
        except JobError:
            raise
        except Exception as exc:
            raise self.classify(exc, f"read {what} {where}") from exc
        if len(data) > max_bytes:
            raise too_large(what, where, len(data), max_bytes)
        return data

    async def upload(
        self, bucket: str, path: str, data: bytes, content_type: str, upsert: bool = True
    ) -> None:
        """Store `data` at bucket/path; with `upsert` a retry overwrites instead of failing."""
        options: Any = {"content-type": content_type, "upsert": "true" if upsert else "false"}
        try:
            await self.client.from_(bucket).upload(path, data, options)
        except Exception as exc:
            raise self.classify(exc, f"store {bucket}/{path}") from exc

    async def signed_url(self, bucket: str, path: str, expires_in_s: int) -> str:
        try:
            signed = await self.client.from_(bucket).create_signed_url(path, expires_in_s)
        except Exception as exc:
            raise self.classify(exc, f"sign a URL for {bucket}/{path}") from exc
        return str(signed["signedURL"])

    async def aclose(self) -> None:
        await self._http.aclose()

    def classify(self, exc: BaseException, doing: str) -> JobError:
        """A Storage failure as the runtime's permanent or retryable error."""
        if isinstance(exc, httpx.TimeoutException | httpx.TransportError):
            return RetryableJobError(f"Could not {doing} in Supabase Storage: {type(exc).__name__}")
        if not isinstance(exc, StorageApiError):
            return RetryableJobError(
                f"Could not {doing} in Supabase Storage: {type(exc).__name__}: {exc}"
            )
        status = _status(exc.status)
        reason = f"HTTP {status} {exc.code}: {str(exc.message)[:200]}"
        if status == 404 or exc.code in ("not_found", "NoSuchKey", "NoSuchBucket"):
            return PermanentJobError(f"Supabase Storage has no such object: could not {doing} "
                                     f"({reason})")  # fmt: skip
        if status in (401, 403):
            return PermanentJobError(
                f"Supabase Storage refused the key: could not {doing} ({reason}); check "
                f"{self.settings.key_variable} (the service role key reads private buckets)"
            )
        if status == 429 or status >= 500 or status == 0:
            return RetryableJobError(f"Supabase Storage is temporarily unavailable: could not "
                                     f"{doing} ({reason})")  # fmt: skip
        return PermanentJobError(f"Supabase Storage refused: could not {doing} ({reason})")


def storage_url(url: str) -> str:
    """`<project URL>/storage/v1`, as supabase-py builds it."""
    return url.rstrip("/") + "/storage/v1"


def split_storage_path(value: str) -> tuple[str, str]:
    """`<bucket>/<path>` → (bucket, path); ValueError when either part is missing."""
    bucket, _, path = value.strip().lstrip("/").partition("/")
    if not bucket or not path.strip("/"):
        raise ValueError(f"expected <bucket>/<path>, got {value!r}")
    return bucket, path


def too_large(what: str, where: str, size: int, max_bytes: int) -> PermanentJobError:
    return PermanentJobError(
        f"The {what} {where} is {_size(size)}, over the {_size(max_bytes)} limit"
    )


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB".replace(".0 MB", " MB") if n >= MB else f"{n} bytes"


def missing_sentence(job_type: str) -> str:
    """Why a job that reads Supabase Storage cannot run without Supabase settings."""
    return (
        f"{job_type} from Supabase Storage needs Supabase: set {' or '.join(URL_VARIABLES)} "
        f"and {KEY_VARIABLES[0]}"
    )


def _size_of(info: Any) -> int | None:
    """The object's size from `info` (storage-api: `size`, older servers `metadata.size`)."""
    if not isinstance(info, Mapping):
        return None
    for value in (info.get("size"), (info.get("metadata") or {}).get("size")):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return None


def _status(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
