"""Download a file a job names by URL, with a size cap and a timeout, errors classified.

    404 / 410 / 401 / 403 / other 4xx   → PermanentJobError (the URL will not start working)
    408 / 429 / 5xx, timeout, network   → RetryableJobError
    larger than `max_bytes`             → PermanentJobError naming the cap

No credentials are ever sent: the URL must be public or presigned.
"""

from __future__ import annotations

import aiohttp
from yarl import URL

from processors.shared.storage import too_large
from worker.errors import PermanentJobError, RetryableJobError

CONNECT_TIMEOUT_S = 10.0
TIMEOUT_S = 30.0
_CHUNK = 64 * 1024


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
    except aiohttp.ClientError as exc:
        raise RetryableJobError(f"Could not download the {what} from {shown}: "
                                f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
