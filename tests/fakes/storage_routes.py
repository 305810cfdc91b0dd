"""Supabase Storage's object API (`/storage/v1/object/...`) over in-memory buckets, served by the
Supabase stand-in (`FakePostgrest`) on the same origin, as a Supabase project serves both.

Routes, as storage-api answers them for what `storage3` sends:

    POST|PUT /object/<bucket>/<path>         upload (multipart field `file`; POST honours
                                             `x-upsert`) → {"Key": "<bucket>/<path>", "Id"}
    GET      /object/<bucket>/<path>         the bytes (also /object/authenticated/...)
    GET      /object/info/<bucket>/<path>    {id, name, bucket_id, size, content_type, ...}
    POST     /object/sign/<bucket>/<path>    {"expiresIn"} → {"signedURL": "/object/sign/…?token="}
    GET      /object/sign/<bucket>/<path>    the bytes, with that token
    GET      /object/public/<bucket>/<path>  the bytes, when the bucket is public

Errors carry storage-api's body `{"statusCode": "<code>", "error", "message"}` (statusCode a
string, as the server sends it).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP

from aiohttp import web

from tests.fakes import json_response

STORAGE = "/storage/v1"
Pre = Callable[[web.Request], web.Response | None]


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    writes: int = 1
    updated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


class FakeStorage:
    """Buckets of objects; `Audio_Lessons` (private) exists, as in the app's project."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, StoredObject]] = {}
        self.public: set[str] = set()
        self._tokens: dict[str, tuple[str, str]] = {}
        self.create_bucket("Audio_Lessons")

    def create_bucket(self, name: str, public: bool = False) -> None:
        self.buckets.setdefault(name, {})
        if public:
            self.public.add(name)

    def put(self, bucket: str, path: str, data: bytes, content_type: str) -> None:
        """Place an object as a user's upload would (the bucket is created if needed)."""
        self.create_bucket(bucket)
        self.buckets[bucket][path] = StoredObject(data, content_type)

    def get(self, bucket: str, path: str) -> StoredObject | None:
        return self.buckets.get(bucket, {}).get(path)

    def objects(self, bucket: str) -> dict[str, StoredObject]:
        return dict(self.buckets.get(bucket, {}))

    def routes(self, app: web.Application, pre: Pre) -> None:
        def guarded(
            handler: Callable[[web.Request], Awaitable[web.Response]],
        ) -> Callable[[web.Request], Awaitable[web.Response]]:
            async def run(request: web.Request) -> web.Response:
                early = pre(request)
                return early if early is not None else await handler(request)

            return run

        obj = STORAGE + "/object"
        tail = "/{bucket}/{path:.+}"
        app.router.add_route("GET", obj + "/info" + tail, guarded(self._info))
        app.router.add_route("POST", obj + "/sign" + tail, guarded(self._sign))
        app.router.add_route("GET", obj + "/sign" + tail, self._signed_get)  # token, no key
        app.router.add_route("GET", obj + "/public" + tail, self._public_get)
        app.router.add_route("GET", obj + "/authenticated" + tail, guarded(self._get))
        app.router.add_route("GET", obj + tail, guarded(self._get))
        app.router.add_route("POST", obj + tail, guarded(self._upload))
        app.router.add_route("PUT", obj + tail, guarded(self._upload))

    # --- handlers ------------------------------------------------------------------------

    def _lookup(self, request: web.Request) -> StoredObject | web.Response:
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        if bucket not in self.buckets:
            return _error(400, "404", "Bucket not found", "Bucket not found")
        found = self.buckets[bucket].get(path)
        if found is None:
            return _error(400, "404", "not_found", "Object not found")
        return found

    async def _get(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        return web.Response(body=found.data, headers={"Content-Type": found.content_type})

    async def _info(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        return json_response(
            200,
            {"id": found.id, "name": request.match_info["path"],
             "bucket_id": request.match_info["bucket"], "version": found.id,
             "size": len(found.data), "content_type": found.content_type,
             "cache_control": "max-age=3600", "etag": f'"{found.id}"', "metadata": {},
             "last_modified": found.updated_at, "created_at": found.updated_at},
        )  # fmt: skip

    async def _sign(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        token = secrets.token_urlsafe(16)
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        self._tokens[token] = (bucket, path)
        return json_response(200, {"signedURL": f"/object/sign/{bucket}/{path}?token={token}"})

    async def _signed_get(self, request: web.Request) -> web.Response:
        where = (request.match_info["bucket"], request.match_info["path"])
        if self._tokens.get(request.query.get("token", "")) != where:
            return _error(400, "400", "InvalidJWT", "invalid signature")
        return await self._get(request)

    async def _public_get(self, request: web.Request) -> web.Response:
        if request.match_info["bucket"] not in self.public:
            return _error(400, "404", "not_found", "Object not found")
        return await self._get(request)

    async def _upload(self, request: web.Request) -> web.Response:
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        if bucket not in self.buckets:
            return _error(400, "404", "Bucket not found", "Bucket not found")
        data, content_type = _file_part(request, await request.read())
        if data is None:
            return _error(400, "400", "InvalidRequest", "no file in the upload")
        objects = self.buckets[bucket]
        existing = objects.get(path)
        upsert = request.method == "PUT" or request.headers.get("x-upsert") == "true"
        if existing is not None and not upsert:
            return _error(400, "409", "Duplicate", "The resource already exists")
        if request.method == "PUT" and existing is None:
            return _error(400, "404", "not_found", "Object not found")
        stored = StoredObject(data, content_type)
        if existing is not None:
            stored.id, stored.writes = existing.id, existing.writes + 1
        objects[path] = stored
        return json_response(200, {"Key": f"{bucket}/{path}", "Id": stored.id})


def _file_part(request: web.Request, raw: bytes) -> tuple[bytes | None, str]:
    """The `file` field of a multipart upload (its bytes and content type), or the raw body."""
    content_type = request.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data"):
        return raw, content_type or "application/octet-stream"
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            payload = part.get_payload(decode=True)
            return (payload if isinstance(payload, bytes) else b""), part.get_content_type()
    return None, ""


def _error(status: int, code: str, error: str, message: str) -> web.Response:
    return json_response(status, {"statusCode": code, "error": error, "message": message})
