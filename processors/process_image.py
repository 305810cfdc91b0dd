"""`process-image`: the text in an image, by Azure AI Vision Image Analysis 4.0 (Read).

Steps: progress 10 → (from Supabase Storage: the image's bytes, refused above 20 MB before they
are read) → azure-vision's breaker and rate limit (worker.providers) → one Read call through
the `azure-ai-vision-imageanalysis` SDK (`analyze_from_url`, or `analyze` with the bytes), a
blocking call made in a worker thread (never on the event loop) → progress 100 and
`{"success": true, "text", "lines": [{"text", "boundingPolygon", "words": [...]}]}`.

Optional: without AZURE_VISION_ENDPOINT and AZURE_VISION_KEY the job type is not built
(`ProviderMissing`), and its jobs fail at once saying so. Without Supabase settings the type
runs for `imageUrl` jobs; a `storageBucket`/`storagePath` job fails at once naming them.

Errors (the SDK's own retries are off: BullMQ and worker.providers decide):

    429                                   → RateLimited (Retry-After; no attempt used)
    5xx, 408, timeout, connection         → RetryableJobError (BullMQ backoff)
    401 / 403                             → PermanentJobError naming the key or endpoint
    400 InvalidImageSize (over 20 MB)     → PermanentJobError naming Azure's size limit
    400 other (unreadable image, bad URL) → PermanentJobError with Azure's own reason
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

from azure.ai.vision.imageanalysis import ImageAnalysisClient
from azure.ai.vision.imageanalysis.models import VisualFeatures
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from processors.shared.retry_after import retry_after_s
from processors.shared.supabase_storage import MB, SupabaseStorage, missing_sentence
from worker.context import JobContext
from worker.contract_types import ImageLine, ImagePayload, ImageResult
from worker.errors import (
    ConfigProblems,
    JobError,
    PermanentJobError,
    ProviderMissing,
    RateLimited,
    RetryableJobError,
)
from worker.providers import AZURE_VISION, Provider, ProviderSettings
from worker.registry import ProcessorSpec

JOB_NAME = "process-image"
ENDPOINT_VARIABLE = "AZURE_VISION_ENDPOINT"
KEY_VARIABLE = "AZURE_VISION_KEY"
# Azure AI Vision 4.0 refuses images over 20 MB (its "Image requirements"); a URL image is
# fetched by Azure, so the limit shows as its 400 InvalidImageSize.
MAX_IMAGE_MB = 20
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
DEFAULT_RETRY_AFTER_S = 10.0


def build(env: Mapping[str, str]) -> ProcessorSpec:
    endpoint = env.get(ENDPOINT_VARIABLE, "").strip()
    key = env.get(KEY_VARIABLE, "").strip()
    if not endpoint or not key:
        raise ProviderMissing(JOB_NAME, "Azure AI Vision", [ENDPOINT_VARIABLE, KEY_VARIABLE])
    problems = ConfigProblems()
    protection = problems.take(lambda: ProviderSettings.from_env(AZURE_VISION, env))
    storage = problems.take(lambda: SupabaseStorage.from_env(env))
    problems.raise_any()
    assert protection is not None
    client = ImageAnalysisClient(
        endpoint=endpoint,
        credential=AzureKeyCredential(key),
        retry_total=0,  # one HTTP call per attempt: retries are BullMQ's, waits the provider's
        connection_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    processor = ImageProcessor(client, Provider(protection, "read"), storage)
    return ProcessorSpec(
        name=JOB_NAME,
        handler=processor.run,
        description="text of an image by Azure AI Vision Image Analysis 4.0 Read",
        notes=() if storage else (f"imageUrl only ({missing_sentence(JOB_NAME)})",),
        aclose=processor.aclose,
    )


class ImageProcessor:
    def __init__(
        self, client: ImageAnalysisClient, provider: Provider, storage: SupabaseStorage | None
    ) -> None:
        self.client = client
        self.provider = provider
        self.storage = storage

    async def run(self, data: dict[str, Any], ctx: JobContext) -> ImageResult:
        payload = cast(ImagePayload, data)  # validated against the contract by the runtime
        await ctx.progress(10)
        read: Callable[[], Any]
        if "imageUrl" in payload:
            url = payload["imageUrl"]
            read = partial(self.client.analyze_from_url, url, [VisualFeatures.READ])
        else:
            image = await self._download(payload["storageBucket"], payload["storagePath"])
            read = partial(self.client.analyze, image, [VisualFeatures.READ])
        async with self.provider.call(ctx.redis) as permit:
            try:
                # The SDK is blocking (requests): a thread keeps the event loop free.
                analysis = await asyncio.to_thread(read)
            except Exception as exc:
                raise await permit.failed(classify_azure_error(exc)) from exc
            await permit.succeeded()
        result = to_result(analysis)
        usd = ctx.provider_usage(AZURE_VISION, "images", 1)
        ctx.log.info(
            "Azure Vision Read: images read 1 (~${:.4f}), {} lines, {} chars",
            usd,
            len(result["lines"]),
            len(result["text"]),
        )
        await ctx.progress(100)
        return result

    async def _download(self, bucket: str, path: str) -> bytes:
        if self.storage is None:
            raise PermanentJobError(missing_sentence(JOB_NAME))
        return await self.storage.download(bucket, path, MAX_IMAGE_MB * MB, "image")

    async def aclose(self) -> None:
        self.client.close()
        if self.storage is not None:
            await self.storage.aclose()


def to_result(analysis: Any) -> ImageResult:
    """The SDK's ImageAnalysisResult → the contract's result (lines of every block, in order)."""
    lines: list[ImageLine] = []
    read = getattr(analysis, "read", None)
    for block in getattr(read, "blocks", None) or []:
        for line in block.lines or []:
            lines.append(
                {
                    "text": line.text,
                    "boundingPolygon": [{"x": p.x, "y": p.y} for p in line.bounding_polygon or []],
                    "words": [
                        {"text": w.text, "confidence": float(w.confidence)}
                        for w in line.words or []
                    ],
                }
            )
    return {"success": True, "text": "\n".join(line["text"] for line in lines), "lines": lines}


def classify_azure_error(exc: BaseException) -> JobError:
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return RetryableJobError(f"Could not reach Azure AI Vision: {type(exc).__name__}")
    if not isinstance(exc, HttpResponseError):
        return RetryableJobError(f"Azure AI Vision call failed: {type(exc).__name__}: {exc}")
    status = exc.status_code or 0
    code, message = _error_of(exc)
    tag = f"HTTP {status}{f' {code}' if code else ''}"
    if status == 429:
        headers = cast(Mapping[str, str], getattr(exc.response, "headers", None) or {})
        return RateLimited(retry_after_s(headers, DEFAULT_RETRY_AFTER_S),
                           f"Azure AI Vision rate limit ({tag})",
                           provider=AZURE_VISION)  # fmt: skip
    if status in (401, 403) or isinstance(exc, ClientAuthenticationError):
        return PermanentJobError(
            f"Azure AI Vision refused the credentials ({tag}): check {KEY_VARIABLE} and "
            f"{ENDPOINT_VARIABLE}: {message}"
        )
    if status == 408 or status >= 500:
        return RetryableJobError(f"Azure AI Vision is temporarily unavailable ({tag}): {message}")
    if code == "InvalidImageSize" or "too large" in message.lower():
        return PermanentJobError(
            f"The image is too large for Azure AI Vision (over {MAX_IMAGE_MB} MB) ({tag})"
        )
    return PermanentJobError(f"Azure AI Vision could not read the image ({tag}): {message}")


def _error_of(exc: HttpResponseError) -> tuple[str, str]:
    """(innermost error code, message) of Azure's `{"error": {code, message, innererror}}`."""
    error = exc.error
    code = str(getattr(error, "code", "") or "")
    message = str(getattr(error, "message", "") or exc.reason or "")
    inner = getattr(error, "innererror", None)
    if isinstance(inner, Mapping) and inner.get("code"):
        code = str(inner["code"])
        message = str(inner.get("message") or message)
    return code, message[:300]
