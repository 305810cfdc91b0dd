"""Download a file a job names by URL, with a size cap and a timeout, errors classified.

    404 / 410 / 401 / 403 / other 4xx   → PermanentJobError (the URL will not start working)
    too many redirects, a redirect to an invalid or non-http URL, an invalid URL
                                        → PermanentJobError (a redirect loop never fixes itself)
    408 / 429 / 5xx, timeout, network   → RetryableJobError
    larger than `max_bytes`             → PermanentJobError naming the cap

No credentials are ever sent: the URL must be public or presigned. Its query (a presigned
signature) never reaches an error: aiohttp's errors carry the URL they met, query and all,
so only their type is reported, with the URL without its query, and they are not chained.
"""

from __future__ import annotations

import aiohttp
from yarl import URL

from processors.shared.supabase_storage import too_large
from worker.errors import PermanentJobError, RetryableJobError

CONNECT_TIMEOUT_S = 10.0
TIMEOUT_S = 30.0
_CHUNK = 64 * 1024
# Fail the same way on every attempt: where the URL (or a redirect) leads does not change.
_PERMANENT = (
    aiohttp.TooManyRedirects,
    aiohttp.InvalidURL,
    aiohttp.RedirectClientError,
    aiohttp.NonHttpUrlClientError,
)


async def download(
    session: aiohttp.ClientSession, url: str, max_bytes: int, what: str = "file"
) -> bytes:
    """The body at `url` (http or https), at most `max_bytes`."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise PermanentJobError(f"The {what} URL must be an http(s) URL, got {url[:100]!r}")
    shown = str(parsed.with_query(None).with_fragment(None))[:200]  # no presigned signature
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
    try:
        async with session.get(parsed, timeout=timeout, allow_redirects=True) as response:
            status = response.status
            if status != 200:
                transient = status in (408, 429) or status >= 500
                error = RetryableJobError if transient else PermanentJobError
                raise error(f"Could not download the {what} (HTTP {status}) from {shown}")
            if (size := response.content_length or 0) > max_bytes:
                raise too_large(what, shown, size, max_bytes)
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > max_bytes:  # no or a false Content-Length: stop reading here
                    raise too_large(what, shown, len(body), max_bytes)
            return bytes(body)
    except TimeoutError as exc:
        raise RetryableJobError(f"Downloading the {what} from {shown} took longer than "
                                f"{TIMEOUT_S:g} s") from exc  # fmt: skip
    except _PERMANENT as exc:
        raise PermanentJobError(
            f"Could not download the {what} from {shown}: {type(exc).__name__}"
        ) from None  # str(exc) and the chained traceback name the full redirect URL
    except aiohttp.ClientError as exc:
        raise RetryableJobError(
            f"Could not download the {what} from {shown}: {type(exc).__name__}"
        ) from None  # as above: a ClientResponseError's str holds the URL with its query
