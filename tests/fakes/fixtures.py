"""The stand-ins as pytest fixtures (registered in tests/conftest.py) and as one context manager.

Per test: `openai_fake`, `db` (seeded from `db_tables`, which a module overrides to seed its
own user) and `stand_in_env`, the variables that point the processors' real SDKs at both.
For a longer-lived service (module-scoped, or inside an exit stack): `stand_ins(tables)`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.postgrest_server import FakePostgrest

OPENAI_API_KEY = "sk-test"

Tables = dict[str, list[dict[str, Any]]]


def users_table(user_id: str, **columns: Any) -> Tables:
    """A `users` table with one user who has already spent some tokens (1000 in, 500 out)."""
    return {"users": [{"id": user_id, "input_tokens": 1000, "output_tokens": 500, **columns}]}


def check_openai(fake: FakeOpenAI) -> None:
    """No call beyond what the test scripted, and no scripted reply that broke its schema."""
    assert fake.unscripted == 0, "OpenAI was called more often than the test scripted"
    assert fake.schema_mismatches == [], (
        f"a scripted reply broke the request's schema: {fake.schema_mismatches}"
    )


@dataclass(frozen=True)
class StandIns:
    openai: FakeOpenAI
    db: FakePostgrest
    # OpenAI's breaker, rate limit and the budget holds are shared through Redis by name: each
    # pair of stand-ins gets its own, so tests on one Redis never trip each other's breaker.
    shared: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}:")

    @property
    def env(self) -> dict[str, str]:
        """What a processor's `build(env)` needs to talk to these servers."""
        return {
            "OPENAI_API_KEY": self.openai.api_key or OPENAI_API_KEY,
            "OPENAI_BASE_URL": self.openai.base_url,
            "SUPABASE_URL": self.db.url,
            "SUPABASE_SERVICE_ROLE_KEY": self.db.api_key,
            "PROTECTION_KEY_PREFIX": self.shared,
        }


@contextlib.asynccontextmanager
async def stand_ins(tables: Tables | None = None) -> AsyncIterator[StandIns]:
    """Both servers, the PostgREST one seeded with `tables`, for as long as the block runs."""
    async with FakeOpenAI(api_key=OPENAI_API_KEY) as openai, FakePostgrest(tables) as db:
        yield StandIns(openai, db)


@pytest.fixture
def db_tables() -> Tables:
    """The rows `db` starts with; override it in a module to seed that module's user."""
    return {}


@pytest_asyncio.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=OPENAI_API_KEY) as fake:
        yield fake
        check_openai(fake)


@pytest_asyncio.fixture
async def db(db_tables: Tables) -> AsyncIterator[FakePostgrest]:
    async with FakePostgrest(db_tables) as fake:
        yield fake


@pytest.fixture
def stand_in_env(openai_fake: FakeOpenAI, db: FakePostgrest) -> dict[str, str]:
    return StandIns(openai_fake, db).env
