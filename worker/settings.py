"""Typed settings, loaded once from a mapping (`os.environ` in `__main__`, a dict in tests)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError, ConfigProblems
from worker.keys import hash_tag

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"

# Blocking waits (BZPOPMIN) last at most 10 s in bullmq; the socket must outlive them, or
# redis-py 8's default 5 s read timeout silently breaks idle pickup, delays and the limiter.
REDIS_SOCKET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RedisSettings:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    source: str = "default"  # which variable it came from, for start-up messages
    # TLS trust: the system CAs, plus this PEM bundle when set (REDIS_TLS_CA_FILE); or, only when
    # asked for by REDIS_TLS_INSECURE=true, no verification at all (self-signed test setups).
    tls_ca_file: str | None = None
    tls_insecure: bool = False
    # Redis Cluster: REDIS_CLUSTER=true, or found at start-up (INFO `cluster_enabled:1`). The
    # URL is any one node; the prefix must then carry a hash tag (`{bull}`), as BullMQ requires.
    cluster: bool = False

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `redis.asyncio.Redis` (and bullmq's dict connection). A pool
        takes `pool_kwargs()` instead: `ssl=True` means something to a client only."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": 10.0,
            "socket_keepalive": True,
        }
        if self.tls:
            kwargs.update(
                ssl=True,
                ssl_cert_reqs="none" if self.tls_insecure else "required",
                ssl_check_hostname=not self.tls_insecure,
                ssl_ca_certs=None if self.tls_insecure else self.tls_ca_file,
            )
        return kwargs

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a `redis.asyncio` connection pool: TLS is its connection class
        (`ssl=True` handed to a pool reached the plain Connection and crashed the service)."""
        kwargs = self.connection_kwargs()
        if kwargs.pop("ssl", False):
            from redis.asyncio.connection import SSLConnection

            kwargs["connection_class"] = SSLConnection
        return kwargs

    @property
    def tls_mode(self) -> str:
        """How the connection is secured, in words, for the banner and `check`."""
        if not self.tls:
            return "no TLS"
        if self.tls_insecure:
            return "TLS WITHOUT certificate verification (REDIS_TLS_INSECURE=true)"
        if self.tls_ca_file:
            return f"TLS, server certificate checked against the system CAs and {self.tls_ca_file}"
        return "TLS, server certificate checked against the system CAs"

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced by `***`: the only form that is ever logged."""
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        return f"{scheme}://{auth}{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True)
class QueueSettings:
    """One consumed queue: its name and the settings each queue may set for itself."""

    name: str
    concurrency: int = 3
    limiter_max: int = 10
    limiter_duration_ms: int = 1000


# Settings a queue may set for itself: the variable plus `_<QUEUE>`, the queue name upper-cased
# with every other character than A-Z and 0-9 as `_` (`WORKER_CONCURRENCY_AUDIO_JOBS`).
PER_QUEUE_VARIABLES = ("WORKER_CONCURRENCY", "WORKER_LIMITER_MAX", "WORKER_LIMITER_DURATION_MS")


def queue_variable(variable: str, queue: str) -> str:
    """`queue_variable("WORKER_CONCURRENCY", "audio-jobs")` -> `WORKER_CONCURRENCY_AUDIO_JOBS`."""
    return f"{variable}_{re.sub(r'[^A-Z0-9]', '_', queue.upper())}"


def _per_queue_base(name: str) -> str | None:
    """The per-queue variable `name` overrides (`WORKER_CONCURRENCY`), or None."""
    # Longest first: WORKER_LIMITER_MAX_ must not take WORKER_LIMITER_MAX_... of another one.
    for base in sorted(PER_QUEUE_VARIABLES, key=len, reverse=True):
        if name.startswith(f"{base}_") and len(name) > len(base) + 1:
            return base
    return None


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    # The first queue consumed: the one `enqueue` and `stats` use by default, and the only one
    # unless `queues` (WORKER_QUEUES) names more.
    queue: str = "ai-jobs"
    prefix: str = "bull"
    concurrency: int = 3
    limiter_max: int = 10
    limiter_duration_ms: int = 1000
    lock_duration_ms: int = 30_000
    stalled_interval_ms: int = 30_000
    max_stalled_count: int = 1
    health_port: int = 3002
    health_port_variable: str = "WORKER_HEALTH_PORT"  # where health_port came from: or PORT
    shutdown_grace_s: float = 25.0
    startup_timeout_s: float = 30.0
    ready_stall_s: float = 120.0
    # Continuous Redis failure of one path (fetch, finish, a chore) this long: exit 1.
    redis_give_up_s: float = 300.0
    log_format: str = "text"
    log_level: str = "INFO"
    environment: str = "development"
    job_types: tuple[str, ...] | None = None  # None: every registered processor
    worker_name: str | None = None
    job_timeout_s: float = 600.0
    # How long a CLI command (check, enqueue, stats) waits for Redis per step before it gives up.
    cli_timeout_s: float = 5.0
    # Stable across restarts of the same replica: lets a restarted worker take back at once the
    # jobs its crashed predecessor held. RAILWAY_REPLICA_ID, else WORKER_NAME; None: off.
    instance_id: str | None = None
    # BullMQ's per-minute completed/failed counts (Node's worker option `metrics:
    # {maxDataPoints}`), read by queue.getMetrics(); one week of minutes by default, 0: off.
    metrics_max_data_points: int = 10_080
    # Lines kept in a job's BullMQ log when the job sets no `keepLogs`; 0: no job logs.
    job_log_lines: int = 100
    # USD per million tokens, input/output, by model ("*": any other), for /metrics' cost.
    ai_prices: tuple[tuple[str, float, float], ...] = (("*", 0.60, 2.40),)
    # USD per unit of a non-token provider's billing (images read, characters synthesised,
    # audio seconds assessed), by (provider, unit), for /metrics' cost and the jobs' log lines.
    provider_prices: tuple[tuple[str, str, float], ...] = ()
    # A job parked for upstream 429s longer than this in total fails, naming the provider.
    rate_limit_max_wait_s: float = 3600.0
    # Every queue consumed (WORKER_QUEUES), each with its concurrency and limiter; empty: only
    # `queue`, with the settings above (`consumed`).
    queues: tuple[QueueSettings, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        reader = _Reader(env)
        redis = reader.problems.take(lambda: redis_settings_from_env(env))
        health_port = reader.integer("WORKER_HEALTH_PORT", None, low=0, high=65535)
        health_port_variable = "WORKER_HEALTH_PORT"
        if health_port is None:
            health_port = reader.integer("PORT", None, low=0, high=65535)
            if health_port is not None:
                health_port_variable = "PORT"
        if health_port is None:
            health_port = 3002
        log_format = reader.choice("LOG_FORMAT", "text", ("text", "json"))
        log_level = reader.choice(
            "LOG_LEVEL", "INFO", ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR")
        )
        job_types = reader.text("WORKER_JOB_TYPES", "")
        default = QueueSettings(
            reader.text("WORKER_QUEUE", "ai-jobs", required=True),
            concurrency=reader.integer("WORKER_CONCURRENCY", 3, low=1, high=1000),
            limiter_max=reader.integer("WORKER_LIMITER_MAX", 10, low=0, high=1_000_000),
            limiter_duration_ms=reader.integer(
                "WORKER_LIMITER_DURATION_MS", 1000, low=1, high=3_600_000
            ),
        )
        queues = _queues_from_env(reader, default)
        settings = cls(
            redis=redis or RedisSettings(),
            queue=queues[0].name,
            prefix=reader.text("WORKER_PREFIX", "bull", required=True),
            concurrency=queues[0].concurrency,
            limiter_max=queues[0].limiter_max,
            limiter_duration_ms=queues[0].limiter_duration_ms,
            queues=queues,
            lock_duration_ms=reader.integer("WORKER_LOCK_DURATION_MS", 30_000, low=1000),
            stalled_interval_ms=reader.integer("WORKER_STALLED_INTERVAL_MS", 30_000, low=1000),
            max_stalled_count=reader.integer("WORKER_MAX_STALLED_COUNT", 1, low=0, high=100),
            health_port=health_port,
            health_port_variable=health_port_variable,
            shutdown_grace_s=reader.number("WORKER_SHUTDOWN_GRACE_S", 25.0, low=0.0),
            startup_timeout_s=reader.number("WORKER_STARTUP_TIMEOUT_S", 30.0, low=1.0),
            ready_stall_s=reader.number("WORKER_READY_STALL_S", 120.0, low=1.0),
            redis_give_up_s=reader.number("WORKER_REDIS_GIVE_UP_S", 300.0, low=1.0),
            log_format=log_format,
            log_level=log_level,
            environment=reader.text("NODE_ENV", "development") or "development",
            job_types=tuple(t.strip() for t in job_types.split(",") if t.strip()) or None,
            worker_name=reader.text("WORKER_NAME", "") or None,
            job_timeout_s=reader.number("WORKER_JOB_TIMEOUT_S", 600.0, low=0.001),
            cli_timeout_s=reader.number("WORKER_CLI_TIMEOUT_S", 5.0, low=0.1),
            instance_id=reader.text("RAILWAY_REPLICA_ID", "")
            or reader.text("WORKER_NAME", "")
            or None,
            metrics_max_data_points=reader.integer(
                "WORKER_METRICS_MAX_DATA_POINTS", 10_080, low=0, high=1_000_000
            ),
            job_log_lines=reader.integer("WORKER_JOB_LOG_LINES", 100, low=0, high=100_000),
            ai_prices=parse_ai_prices(reader.text("WORKER_AI_PRICES", "")),
            provider_prices=parse_provider_prices(reader.text("WORKER_PROVIDER_PRICES", "")),
            rate_limit_max_wait_s=reader.number("WORKER_RATE_LIMIT_MAX_WAIT_S", 3600.0, low=0.0),
        )
        if settings.redis.cluster and (
            problem := settings.cluster_prefix_problem("REDIS_CLUSTER=true")
        ):
            reader.problems.add("WORKER_PREFIX", problem)
        reader.problems.raise_any()
        return settings

    def cluster_prefix_problem(self, why: str) -> str | None:
        """Why the prefix cannot be used on a Redis Cluster, or None. BullMQ's scripts touch many
        keys of a queue at once; a cluster runs them only when every key hashes to one slot,
        which a hash tag in the prefix (`{bull}`: only `bull` is hashed) guarantees."""
        if hash_tag(self.prefix) is not None:
            return None
        return (
            f"{self.prefix!r} has no hash tag, and the server is a Redis Cluster ({why}): the "
            f"queue's keys would land in different slots and BullMQ's scripts would fail "
            f"(CROSSSLOT). Use a prefix with a hash tag, e.g. WORKER_PREFIX={{{self.prefix}}}, "
            f"and the same prefix in the web service's Queue"
        )

    def cluster_error(self, why: str) -> ConfigError | None:
        problem = self.cluster_prefix_problem(why)
        return ConfigError("WORKER_PREFIX", problem) if problem else None

    def health_port_error(self, exc: OSError) -> ConfigError:
        """A health port that cannot be bound is a setting to change: say which one."""
        variable = self.health_port_variable
        other = "PORT" if variable == "WORKER_HEALTH_PORT" else "WORKER_HEALTH_PORT"
        return ConfigError(
            variable,
            f"health port {self.health_port} cannot be bound ({exc.strerror or exc}); another "
            f"process holds it? Set {variable} (or {other}) to a free port",
        )

    @property
    def limiter(self) -> dict[str, int] | None:
        if self.limiter_max == 0:  # 0 turns the limiter off
            return None
        return {"max": self.limiter_max, "duration": self.limiter_duration_ms}

    @property
    def limiter_text(self) -> str:
        """The limiter as the banner and `check` state it."""
        if self.limiter is None:
            return "off"
        return f"{self.limiter_max} jobs per {self.limiter_duration_ms} ms (queue-wide)"

    @property
    def consumed(self) -> tuple[QueueSettings, ...]:
        """Every queue this worker consumes, in WORKER_QUEUES' order."""
        if self.queues:
            return self.queues
        return (
            QueueSettings(self.queue, self.concurrency, self.limiter_max, self.limiter_duration_ms),
        )

    def for_queue(self, queue: QueueSettings) -> Settings:
        """These settings as a worker of `queue` alone sees them (one JobLoop, one protocol)."""
        return replace(
            self,
            queue=queue.name,
            concurrency=queue.concurrency,
            limiter_max=queue.limiter_max,
            limiter_duration_ms=queue.limiter_duration_ms,
            queues=(queue,),
        )

    def for_queue_named(self, name: str) -> Settings:
        """`for_queue` of a consumed queue by name; any other queue (the CLI's `--queue`) with
        these settings' own concurrency and limiter."""
        for queue in self.consumed:
            if queue.name == name:
                return self.for_queue(queue)
        return replace(self, queue=name, queues=())


def _queues_from_env(reader: _Reader, default: QueueSettings) -> tuple[QueueSettings, ...]:
    """WORKER_QUEUES (default: WORKER_QUEUE alone), each queue with its own concurrency and
    limiter: `WORKER_CONCURRENCY_<QUEUE>` and the like, else the unsuffixed variable's value.
    Empty, duplicate or ambiguous names, a queue name with `:` (BullMQ refuses it), and a
    per-queue variable naming a queue that is not consumed are refused, naming the variable."""
    listed = reader.text("WORKER_QUEUES", "")
    names = [default.name]
    if listed:
        names = [name.strip() for name in listed.split(",")]
        if "" in names:
            reader.problems.add("WORKER_QUEUES", f"an empty queue name in {listed!r}")
        names = [name for name in names if name]
        if reader.env.get("WORKER_QUEUE", "").strip() and default.name not in names:
            reader.problems.add(
                "WORKER_QUEUE",
                f"{default.name!r} is not among WORKER_QUEUES ({', '.join(names)}): "
                f"unset WORKER_QUEUE, or list it in WORKER_QUEUES",
            )
    suffixes: dict[str, str] = {}
    for name in names:
        if ":" in name:
            reader.problems.add("WORKER_QUEUES", f"queue name {name!r} contains ':'")
        suffix = queue_variable("", name)
        if name in suffixes.values():
            reader.problems.add("WORKER_QUEUES", f"queue {name!r} is listed twice")
        elif suffix in suffixes:
            reader.problems.add(
                "WORKER_QUEUES",
                f"queues {suffixes[suffix]!r} and {name!r} would share the per-queue "
                f"variables (WORKER_CONCURRENCY{suffix}): rename one",
            )
        else:
            suffixes[suffix] = name
    for variable in reader.env:
        base = _per_queue_base(variable)
        if base and variable[len(base) :] not in suffixes and reader.env[variable].strip():
            reader.problems.add(
                variable,
                f"sets {base} for a queue this worker does not consume "
                f"(WORKER_QUEUES: {', '.join(suffixes.values()) or '-'}); known here: "
                + ", ".join(queue_variable(base, name) for name in suffixes.values()),
            )
    queues = tuple(
        QueueSettings(
            name,
            concurrency=reader.integer(
                queue_variable("WORKER_CONCURRENCY", name), default.concurrency, low=1, high=1000
            ),
            limiter_max=reader.integer(
                queue_variable("WORKER_LIMITER_MAX", name),
                default.limiter_max,
                low=0,
                high=1_000_000,
            ),
            limiter_duration_ms=reader.integer(
                queue_variable("WORKER_LIMITER_DURATION_MS", name),
                default.limiter_duration_ms,
                low=1,
                high=3_600_000,
            ),
        )
        for name in suffixes.values()
    )
    return queues or (default,)


def unread_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each `WORKER_*` variable in `env` that the service does not read (a typo:
    `WORKER_CONCURENCY=50` would run at the default concurrency), naming the closest known one."""
    known = sorted(n for n in variables_read() if n.startswith("WORKER_"))
    warnings = []
    # A per-queue variable is read, or refused by `Settings.from_env`: never "unknown" here.
    for name in sorted(
        n for n in env if n.startswith("WORKER_") and n not in known and not _per_queue_base(n)
    ):
        # Compared without the shared `WORKER_`, which would make every name look close.
        close = difflib.get_close_matches(name[7:], [k[7:] for k in known], n=1, cutoff=0.6)
        hint = f"did you mean WORKER_{close[0]}?" if close else f"known: {', '.join(known)}"
        warnings.append(f"{name} is not a setting of this worker and is ignored; {hint}")
    return warnings


def variables_read() -> frozenset[str]:
    """Every variable `Settings.from_env` reads, found by reading an empty environment (so the
    list cannot fall behind the code)."""
    recorder = _Recorder()
    Settings.from_env(recorder)
    return frozenset(n for n in recorder.names if not _per_queue_base(n))


class _Recorder(Mapping[str, str]):
    """An empty environment that notes every name asked for."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


DEFAULT_AI_PRICE = ("*", 0.60, 2.40)  # processors/shared/budget.py's prices (INTEROP §5)


def parse_ai_prices(text: str) -> tuple[tuple[str, float, float], ...]:
    """`model=input/output,...` in USD per million tokens; `*` prices every other model."""
    prices: dict[str, tuple[float, float]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        model, _, pair = item.partition("=")
        try:
            given, output = (float(v) for v in pair.split("/"))
        except ValueError:
            raise ConfigError(
                "WORKER_AI_PRICES", f"expected model=input/output (USD per 1M tokens), got {item!r}"
            ) from None
        if not model.strip() or min(given, output) < 0 or given != given or output != output:
            raise ConfigError("WORKER_AI_PRICES", f"bad entry {item!r}")
        prices[model.strip()] = (given, output)
    prices.setdefault(DEFAULT_AI_PRICE[0], DEFAULT_AI_PRICE[1:])
    return tuple((model, given, output) for model, (given, output) in prices.items())


# List prices (USD per unit, pay-as-you-go, first tier) when this was written: Azure AI Vision
# Read $1.50 per 1,000 images; Amazon Polly $4 (standard) / $16 (neural) per 1M characters;
# Azure Speech to text (pronunciation assessment is billed as recognised audio) $1 per hour.
# Contracts differ: WORKER_PROVIDER_PRICES overrides any of them.
DEFAULT_PROVIDER_PRICES: dict[tuple[str, str], float] = {
    ("azure-vision", "images"): 1.50 / 1000,
    ("polly", "characters-standard"): 4.0 / 1_000_000,
    ("polly", "characters-neural"): 16.0 / 1_000_000,
    ("azure-speech", "audio-seconds"): 1.0 / 3600,
}


def parse_provider_prices(text: str) -> tuple[tuple[str, str, float], ...]:
    """`provider:unit=usd,...` in USD per unit (e.g. `polly:characters-neural=0.000016`), over
    DEFAULT_PROVIDER_PRICES; a unit without a price is counted and costs 0."""
    prices = dict(DEFAULT_PROVIDER_PRICES)
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        provider, _, unit = name.strip().partition(":")
        try:
            usd = float(value)
        except ValueError:
            usd = -1.0
        if not provider or not unit or not usd >= 0 or usd == float("inf"):
            raise ConfigError(
                "WORKER_PROVIDER_PRICES",
                f"expected provider:unit=USD per unit (e.g. polly:characters-neural=0.000016), "
                f"got {item!r}",
            )
        prices[(provider, unit)] = usd
    return tuple((provider, unit, usd) for (provider, unit), usd in prices.items())


def redis_settings_from_env(env: Mapping[str, str]) -> RedisSettings:
    """Where (`_redis_address`), then how TLS trusts the server: REDIS_TLS_CA_FILE, a PEM
    bundle added to the system CAs, or REDIS_TLS_INSECURE=true, no verification."""
    redis = _redis_address(env)
    reader = _Reader(env)
    ca_file = reader.text("REDIS_TLS_CA_FILE", "") or None
    insecure = reader.choice("REDIS_TLS_INSECURE", "false", _BOOLEAN) in ("true", "1")
    if ca_file is not None:
        if not redis.tls:
            reader.problems.add(
                "REDIS_TLS_CA_FILE",
                f"set, but {redis.source} is not TLS: use rediss:// (or REDIS_TLS=true)",
            )
        elif insecure:
            reader.problems.add(
                "REDIS_TLS_CA_FILE", "set together with REDIS_TLS_INSECURE=true: choose one"
            )
        elif problem := _pem_problem(ca_file):
            reader.problems.add("REDIS_TLS_CA_FILE", problem)
    if insecure and not redis.tls:
        reader.problems.add(
            "REDIS_TLS_INSECURE", f"set, but {redis.source} is not TLS: use rediss://"
        )
    cluster = reader.choice("REDIS_CLUSTER", "false", _BOOLEAN) in ("true", "1")
    if cluster and redis.db:
        reader.problems.add(
            "REDIS_CLUSTER", f"a cluster has database 0 only; {redis.source} asks for /{redis.db}"
        )
    reader.problems.raise_any()
    return replace(redis, tls_ca_file=ca_file, tls_insecure=insecure, cluster=cluster)


_BOOLEAN = ("true", "false", "1", "0")


def _pem_problem(path: str) -> str | None:
    """Why `path` is no PEM CA bundle, or None: caught at start-up, not at the first connect."""
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 20)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if b"-----BEGIN CERTIFICATE-----" not in head:
        return f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    return None


def _redis_address(env: Mapping[str, str]) -> RedisSettings:
    """REDIS_PUBLIC_URL > REDIS_URL > REDIS_HOST/REDIS_PORT/REDIS_PASSWORD (INTEROP §6)."""
    for name in ("REDIS_PUBLIC_URL", "REDIS_URL"):
        value = env.get(name, "").strip()
        if value:
            return parse_redis_url(value, source=name)
    reader = _Reader(env)
    if env.get("REDIS_HOST", "").strip():
        settings = RedisSettings(
            host=reader.text("REDIS_HOST", "127.0.0.1"),
            port=reader.integer("REDIS_PORT", 6379, low=1, high=65535),
            db=reader.integer("REDIS_DB", 0, low=0, high=10_000),
            username=env.get("REDIS_USERNAME") or None,
            password=env.get("REDIS_PASSWORD") or None,
            tls=reader.choice("REDIS_TLS", "false", _BOOLEAN) in ("true", "1"),
            source="REDIS_HOST",
        )
        reader.problems.raise_any()
        return settings
    return parse_redis_url(DEFAULT_REDIS_URL, source="default")


def parse_redis_url(url: str, source: str) -> RedisSettings:
    """Parse redis:// and rediss:// URLs, honouring username, password and /db."""
    # Never echo the URL itself in an error: it may hold a password.
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(source, f"not a valid Redis URL ({exc.__class__.__name__})") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(source, f"scheme must be redis:// or rediss://, got {parts.scheme!r}://")
    if not parts.hostname:
        raise ConfigError(source, "the Redis URL has no host")
    db_text = parts.path.lstrip("/")
    if db_text and not db_text.isdigit():
        raise ConfigError(source, f"database must be a number, got /{db_text}")
    return RedisSettings(
        host=parts.hostname,
        port=port or 6379,
        db=int(db_text) if db_text else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
        source=source,
    )


class _Reader:
    """Reads typed values from the mapping; every failure names the variable. A malformed value
    is noted and its default used, so that one `from_env` reports every problem at once."""

    def __init__(self, env: Mapping[str, str], problems: ConfigProblems | None = None) -> None:
        self.env = env
        self.problems = problems or ConfigProblems()

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _bad(self, name: str, problem: str, default: Any) -> Any:
        self.problems.add(name, problem)
        return default

    def text(self, name: str, default: str, required: bool = False) -> str:
        raw = self._raw(name)
        if raw is None and required and name in self.env:
            return str(self._bad(name, "must not be empty", default))
        return raw if raw is not None else default

    def integer(
        self, name: str, default: int | None, low: int | None = None, high: int | None = None
    ) -> Any:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            return self._bad(name, f"expected a whole number, got {raw!r}", default)
        return self._in_range(name, value, default, low, high)

    def number(self, name: str, default: float, low: float | None = None) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            return float(self._bad(name, f"expected a number, got {raw!r}", default))
        if value != value or value in (float("inf"), float("-inf")):
            return float(self._bad(name, f"expected a finite number, got {raw!r}", default))
        return float(self._in_range(name, value, default, low, None))

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        for option in allowed:
            if raw.lower() == option.lower():
                return option
        return str(self._bad(name, f"expected one of {', '.join(allowed)}, got {raw!r}", default))

    def _in_range(
        self, name: str, value: float, default: Any, low: float | None, high: float | None
    ) -> Any:
        if low is not None and value < low:
            return self._bad(name, f"must be at least {low}, got {value}", default)
        if high is not None and value > high:
            return self._bad(name, f"must be at most {high}, got {value}", default)
        return value
