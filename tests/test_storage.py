"""processors/shared/supabase_storage.py against the Supabase stand-in's Storage routes (the `db`
fixture): what each call sends, and how each failure is classified for the runtime."""

from __future__ import annotations

import aiohttp
import pytest

from processors.shared.supabase_storage import SupabaseStorage, split_storage_path
from tests.fakes.postgrest_server import FakePostgrest
from worker.errors import PermanentJobError, RetryableJobError

MP3 = b"ID3\x04\x00" + bytes(range(200))


def storage_of(db: FakePostgrest, key: str | None = None) -> SupabaseStorage:
    env = {"SUPABASE_URL": db.url, "SUPABASE_SERVICE_ROLE_KEY": key or db.api_key}
    storage = SupabaseStorage.from_env(env)
    assert storage is not None
    return storage


async def test_upload_overwrites_on_retry_and_reads_back(db: FakePostgrest) -> None:
    storage = storage_of(db)
    try:
        await storage.upload("Audio_Lessons", "u1/lesson-1.mp3", MP3, "audio/mpeg")
        await storage.upload("Audio_Lessons", "u1/lesson-1.mp3", MP3 + b"!", "audio/mpeg")
        stored = db.storage.get("Audio_Lessons", "u1/lesson-1.mp3")
        assert stored is not None and stored.writes == 2  # one object, written twice
        assert stored.data == MP3 + b"!" and stored.content_type == "audio/mpeg"
        assert await storage.download("Audio_Lessons", "u1/lesson-1.mp3", 1000) == MP3 + b"!"
        (first, _) = db.rest_requests("POST", "/storage/v1/object/Audio_Lessons/u1/lesson-1.mp3")
        assert first.header("x-upsert") == "true" and first.header("apikey") == db.api_key
        assert first.header("X-Client-Info").startswith("supabase-py/")
    finally:
        await storage.aclose()


async def test_without_upsert_an_existing_object_is_refused(db: FakePostgrest) -> None:
    storage = storage_of(db)
    try:
        await storage.upload("Audio_Lessons", "a.mp3", MP3, "audio/mpeg", upsert=False)
        with pytest.raises(PermanentJobError, match="already exists"):
            await storage.upload("Audio_Lessons", "a.mp3", MP3, "audio/mpeg", upsert=False)
    finally:
        await storage.aclose()


async def test_a_signed_url_serves_the_object(db: FakePostgrest) -> None:
    db.storage.put("Audio_Lessons", "u1/x.mp3", MP3, "audio/mpeg")
    storage = storage_of(db)
    try:
        signed = await storage.signed_url("Audio_Lessons", "u1/x.mp3", 3600)
        async with aiohttp.ClientSession() as http:
            async with http.get(signed) as response:  # no key: the token is the credential
                assert response.status == 200 and await response.read() == MP3
    finally:
        await storage.aclose()


async def test_failures_are_classified(db: FakePostgrest) -> None:
    db.storage.put("uploads", "a.wav", b"RIFF", "audio/wav")
    storage = storage_of(db)
    bad_key = storage_of(db, key="wrong")
    try:
        with pytest.raises(PermanentJobError, match=r"no such object.*uploads/missing\.wav"):
            await storage.download("uploads", "missing.wav", 1000)
        with pytest.raises(PermanentJobError, match=r"no such object.*nobucket/a\.wav"):
            await storage.download("nobucket", "a.wav", 1000)
        with pytest.raises(PermanentJobError, match=r"refused the key.*SUPABASE_SERVICE_ROLE_KEY"):
            await bad_key.download("uploads", "a.wav", 1000)
        with pytest.raises(PermanentJobError, match=r"a\.wav is 4 bytes, over the 3 "):
            await storage.download("uploads", "a.wav", 3, "audio")
        db.fail("GET", "/storage/v1/object/uploads/a.wav", 502,
                {"statusCode": "502", "error": "BadGateway", "message": "upstream"})  # fmt: skip
        with pytest.raises(RetryableJobError, match="temporarily unavailable"):
            await storage.download("uploads", "a.wav", 1000)
        assert await storage.download("uploads", "a.wav", 1000) == b"RIFF"
    finally:
        await storage.aclose()
        await bad_key.aclose()


async def test_unreachable_storage_is_retryable() -> None:
    async with FakePostgrest() as gone:
        storage = storage_of(gone)
    try:  # the server has stopped: connection refused
        with pytest.raises(RetryableJobError, match="Could not read"):
            await storage.download("uploads", "a.wav", 1000)
    finally:
        await storage.aclose()


def test_split_storage_path() -> None:
    assert split_storage_path("Audio_Lessons/u1/x.wav") == ("Audio_Lessons", "u1/x.wav")
    for bad in ("nobucket", "bucket/", "/x", ""):
        with pytest.raises(ValueError):
            split_storage_path(bad)
