"""The one settings tree of interlock.

Settings are read once, at an entrypoint, and passed down. Precedence, highest first:
explicit arguments (CLI options), ``INTERLOCK_*`` environment variables, the TOML config
file, then the defaults below. Nested fields use ``__`` in variable names, e.g.
``INTERLOCK_SERVING__MAX_BATCH_SIZE=128``. This is the only module that reads the
environment.

| setting | environment variable | type | default |
|---|---|---|---|
| home | INTERLOCK_HOME | path | ``.interlock`` |
| database_url | INTERLOCK_DATABASE_URL | URL | ``sqlite:///<home>/interlock.db`` |
| artifacts_dir | INTERLOCK_ARTIFACTS_DIR | path | ``<home>/artifacts`` |
| server.host | INTERLOCK_SERVER__HOST | str | ``127.0.0.1`` |
| server.port | INTERLOCK_SERVER__PORT | int | ``8000`` |
| server.max_body_bytes | INTERLOCK_SERVER__MAX_BODY_BYTES | int | ``8388608`` (8 MiB) |
| server.access_log | INTERLOCK_SERVER__ACCESS_LOG | bool | ``false`` |
| serving.max_batch_size | INTERLOCK_SERVING__MAX_BATCH_SIZE | int (rows) | ``256`` |
| serving.max_batch_wait_ms | INTERLOCK_SERVING__MAX_BATCH_WAIT_MS | float | ``0`` (greedy) |
| serving.min_replicas | INTERLOCK_SERVING__MIN_REPLICAS | int | ``1`` worker per version |
| serving.max_replicas | INTERLOCK_SERVING__MAX_REPLICAS | int | ``2`` |
| serving.scale_cooldown_s | INTERLOCK_SERVING__SCALE_COOLDOWN_S | float | ``10`` |
| serving.target_queue_delay_ms | INTERLOCK_SERVING__TARGET_QUEUE_DELAY_MS | float | ``5`` |
| serving.max_queue_rows | INTERLOCK_SERVING__MAX_QUEUE_ROWS | int | ``8192``: beyond, 429 |
| serving.default_timeout_ms | INTERLOCK_SERVING__DEFAULT_TIMEOUT_MS | float | ``1000`` |
| cache.url | INTERLOCK_CACHE__URL | URL | ``memory://``; or ``redis://…`` |
| cache.enabled | INTERLOCK_CACHE__ENABLED | bool | ``true`` |
| cache.ttl_s | INTERLOCK_CACHE__TTL_S | float | ``60`` |
| cache.max_bytes | INTERLOCK_CACHE__MAX_BYTES | int | ``67108864`` (64 MiB, memory only) |
| cache.timeout_ms | INTERLOCK_CACHE__TIMEOUT_MS | float | ``50`` (Redis calls) |
| breaker.failure_rate | INTERLOCK_BREAKER__FAILURE_RATE | float | ``0.5`` |
| breaker.slow_call_rate | INTERLOCK_BREAKER__SLOW_CALL_RATE | float | ``1.0`` (off) |
| breaker.slow_call_ms | INTERLOCK_BREAKER__SLOW_CALL_MS | float | ``1000`` |
| breaker.window_calls | INTERLOCK_BREAKER__WINDOW_CALLS | int | ``50`` |
| breaker.min_calls | INTERLOCK_BREAKER__MIN_CALLS | int | ``10`` |
| breaker.open_s | INTERLOCK_BREAKER__OPEN_S | float | ``5`` |
| breaker.half_open_calls | INTERLOCK_BREAKER__HALF_OPEN_CALLS | int | ``3`` |
| serving.alias_refresh_s | INTERLOCK_SERVING__ALIAS_REFRESH_S | float | ``1.0`` |
| auth.admin_key | INTERLOCK_AUTH__ADMIN_KEY | secret | none (admin API: loopback only) |
| auth.client_keys | INTERLOCK_AUTH__CLIENT_KEYS | list of secrets | none (predictions open) |
| auth.allow_code_uploads | INTERLOCK_AUTH__ALLOW_CODE_UPLOADS | bool | ``false`` (refused) |
| log.level | INTERLOCK_LOG__LEVEL | str | ``info`` |
| log.json_lines | INTERLOCK_LOG__JSON_LINES | bool | JSON when stderr is not a TTY |
| bus.url | INTERLOCK_BUS_URL (over INTERLOCK_BUS__URL) | URL | ``memory://`` |
| llm.deployments[].api_key_env | the variable it names | secret | none: no key sent |
| llm.tenants[].key_env | the variable it names | secret | required per tenant |

The config file is ``--config PATH``, else ``INTERLOCK_CONFIG``, else ``./interlock.toml``
when it exists. The keys of LLM deployments and tenants stay in the variables the settings
name; :meth:`LLMDeployment.api_key` and :meth:`LLMTenant.key` read them, when the
gateway is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from interlock.errors import ConfigError

__all__ = [
    "AuthSettings",
    "BreakerSettings",
    "BusSettings",
    "CacheSettings",
    "LLMCacheSettings",
    "LLMDeployment",
    "LLMLimitSettings",
    "LLMModel",
    "LLMRetrySettings",
    "LLMSettings",
    "LLMTenant",
    "LogSettings",
    "ServerSettings",
    "ServingSettings",
    "Settings",
    "load_settings",
    "mask_url",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(BaseModel):
    model_config = _FROZEN

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    access_log: bool = False


class ServingSettings(BaseModel):
    model_config = _FROZEN

    max_batch_size: int = Field(256, ge=1, description="rows predicted together at most")
    max_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="while a batch runs, how long a partial batch may wait before it takes "
        "another free thread; 0: it waits for a full batch or a free thread",
    )
    min_replicas: int = Field(1, ge=1, description="inference workers per version, at least")
    max_replicas: int = Field(2, ge=1, description="inference workers per version, at most")
    scale_cooldown_s: float = Field(10.0, ge=0, description="time between two scaling steps")
    target_queue_delay_ms: float = Field(
        5.0, gt=0, description="queueing delay above which the worker pool grows"
    )
    max_queue_rows: int = Field(8192, ge=1, description="rows a version may queue; beyond: 429")
    default_timeout_ms: float = Field(
        1000.0, gt=0, description="deadline of a request without x-request-timeout-ms"
    )
    alias_refresh_s: float = Field(1.0, gt=0, description="how often aliases are re-read")
    gil_switch_interval_ms: float = Field(
        1.0,
        gt=0,
        description="how long a thread keeps the GIL while another waits for it "
        "(sys.setswitchinterval) in interlock serve and worker; CPython's default is 5",
    )


class CacheSettings(BaseModel):
    model_config = _FROZEN

    url: str = "memory://"
    enabled: bool = True
    ttl_s: float = Field(60.0, gt=0)
    max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="memory backend only")
    timeout_ms: float = Field(50.0, gt=0, description="per Redis call; then a miss")


class BreakerSettings(BaseModel):
    """Per model version, as resilience4j: count-based sliding window."""

    model_config = _FROZEN

    failure_rate: float = Field(0.5, gt=0, le=1)
    slow_call_rate: float = Field(1.0, gt=0, le=1, description="1.0: slow calls never open it")
    slow_call_ms: float = Field(1000.0, gt=0)
    window_calls: int = Field(50, ge=1)
    min_calls: int = Field(10, ge=1)
    open_s: float = Field(5.0, gt=0)
    half_open_calls: int = Field(3, ge=1)


class AuthSettings(BaseModel):
    """Who may do what over HTTP; the README's "Security" section is the threat model."""

    model_config = _FROZEN

    admin_key: SecretStr | None = Field(
        None,
        description="the key of the admin API; unset, the admin API answers loopback "
        "clients only and refuses uploads that run code",
    )
    client_keys: list[SecretStr] = Field(
        default_factory=list, description="keys for predictions; none: predictions are open"
    )
    allow_code_uploads: bool = Field(
        False,
        description="the admin API may register artifacts that run code when loaded (the "
        "python format, trusted pickles); they still need the admin key. The CLI, run by "
        "the operator, is not bound by it",
    )


class LogSettings(BaseModel):
    model_config = _FROZEN

    level: str = "info"
    json_lines: bool | None = None


class BusSettings(BaseModel):
    """The event bus and the prediction worker (``interlock worker``)."""

    model_config = _FROZEN

    url: str = Field("memory://", description="memory://, redis://, kafka://host:port, nats://")
    group: str = Field("interlock", min_length=1, description="the workers' consumer group")
    requests_topic: str = "ai.prediction.requested"
    completed_topic: str = "ai.prediction.completed"
    dead_letter_topic: str = "ai.prediction.dead-letter"
    concurrency: int = Field(1024, ge=1, description="events in flight per worker at most")
    batch: int = Field(256, ge=1, description="events taken from the bus at once at most")
    max_attempts: int = Field(4, ge=1, description="tries of a transient failure, then DLQ")
    retry_base_ms: float = Field(50.0, ge=0, description="backoff before the first retry")
    dedupe_url: str | None = Field(
        None,
        description="redis:// for the idempotency records; default: the bus's Redis, "
        "else the metadata database",
    )
    dedupe_ttl_s: float = Field(86400.0, gt=0, description="how long a requestId is remembered")
    timeout_ms: float = Field(5000.0, gt=0, description="deadline of one event's prediction")
    redelivery_s: float = Field(
        30.0,
        gt=0,
        description="how long a dead consumer's unacknowledged messages wait before another "
        "member takes them (Redis claim idle time, NATS ack wait, Kafka session timeout)",
    )
    kafka_fetch_wait_ms: int = Field(
        5,
        ge=0,
        description="how long a Kafka broker may hold a fetch that finds nothing (Kafka's "
        "fetch.max.wait.ms); tansu holds every fetch this long",
    )
    kafka_partitions: int = Field(
        16,
        ge=1,
        description="partitions of the Kafka topics interlock creates: at most this many "
        "workers of one group get work",
    )
    kafka_commit_interval_ms: float = Field(
        200.0,
        ge=0,
        description="Kafka offsets of acknowledged events are committed this often (0: at "
        "every acknowledgement); a crashed worker's successor re-answers at most this much",
    )
    publish_http: bool = Field(
        False, description="interlock serve publishes completed events for HTTP predictions"
    )


# -- LLM gateway ------------------------------------------------------------------------


class LLMDeployment(BaseModel):
    """One upstream endpoint serving one model: what ``[[llm.deployments]]`` holds."""

    model_config = _FROZEN

    name: str = Field(min_length=1, description="unique among deployments")
    provider: Literal["openai", "anthropic"] = "openai"
    base_url: str = Field(min_length=1, description="e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(None, description="the variable holding the key")
    model: str = Field(min_length=1, description="the upstream's model name")
    rpm: int | None = Field(None, gt=0, description="requests per minute the provider allows")
    tpm: int | None = Field(None, gt=0, description="tokens per minute the provider allows")
    input_cost_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 prompt tokens")
    output_cost_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 completion tokens")
    timeout_s: float = Field(60.0, gt=0, description="per attempt")
    weight: float = Field(1.0, gt=0, description="share under the 'weighted' strategy")
    max_connections: int = Field(256, ge=1, description="open connections to the upstream")
    api_version: str | None = Field(None, description="anthropic-version, when it matters")

    def api_key(self) -> SecretStr | None:
        """The key in the variable ``api_key_env`` names (stripped); None without one.

        Raises:
            ConfigError: ``api_key_env`` names a variable that is unset or empty.
        """
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"LLM deployment {self.name!r} reads its key from "
                f"${self.api_key_env}, which is not set"
            )
        return SecretStr(key)


class LLMModel(BaseModel):
    """A model name clients ask for, served by one or more deployments."""

    model_config = _FROZEN

    name: str = Field(min_length=1)
    deployments: list[str] = Field(min_length=1)
    strategy: Literal["latency", "weighted", "least-busy"] = "latency"
    fallbacks: list[str] = Field(default_factory=list, description="other model names, in order")
    semantic_cache: bool = Field(False, description="answer close paraphrases from the cache")
    semantic_threshold: float | None = Field(None, gt=0, le=1, description="else the cache's")


class LLMTenant(BaseModel):
    """A client of the gateway, known by its key; with no tenants the gateway is open."""

    model_config = _FROZEN

    name: str = Field(min_length=1)
    key_env: str = Field(min_length=1, description="the variable holding the tenant's key")
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    budget_usd_per_day: float | None = Field(None, ge=0)
    budget_usd_per_month: float | None = Field(None, ge=0)

    def key(self) -> SecretStr:
        """The tenant's key, from the variable ``key_env`` names.

        Raises:
            ConfigError: the variable is unset or empty.
        """
        key = os.environ.get(self.key_env)
        if not key:
            raise ConfigError(
                f"tenant {self.name!r}: the variable {self.key_env} holding its key is not set"
            )
        return SecretStr(key)


class LLMCacheSettings(BaseModel):
    model_config = _FROZEN

    enabled: bool = True
    url: str = Field("memory://", description="memory:// or redis://host:port/db")
    ttl_s: float = Field(3600.0, gt=0, description="how long an answer is served fresh")
    stale_ttl_s: float = Field(
        86400.0, ge=0, description="how long after that it may answer when nothing else can"
    )
    max_bytes: int = Field(128 * 1024 * 1024, gt=0, description="memory backend only")
    cache_sampled: bool = Field(False, description="cache requests with temperature > 0 too")
    semantic_embeddings: str | None = Field(
        None,
        description="an [[llm.models]] name whose embeddings the semantic cache uses; "
        "unset: the local model of interlock[semantic]",
    )
    semantic_threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity")
    semantic_max_entries: int = Field(100_000, ge=1, description="per tenant and model")


class LLMLimitSettings(BaseModel):
    model_config = _FROZEN

    url: str = Field("memory://", description="memory:// (one node) or redis:// (shared)")
    queue: bool = Field(False, description="over a limit: wait until the deadline, not 429")


class LLMRetrySettings(BaseModel):
    model_config = _FROZEN

    max_attempts: int = Field(3, ge=1, description="per deployment, the first included")
    base_delay_ms: float = Field(100.0, ge=0)
    max_delay_ms: float = Field(5000.0, ge=0)
    budget_ratio: float = Field(0.2, ge=0, description="retries allowed per request, on average")
    budget_min_per_s: float = Field(10.0, ge=0, description="retries always allowed per second")
    timeout_s: float = Field(120.0, gt=0, description="whole-request deadline by default")


def _llm_breaker() -> BreakerSettings:
    return BreakerSettings(
        failure_rate=0.5, slow_call_ms=30_000.0, window_calls=20, min_calls=5, open_s=30.0
    )


class LLMSettings(BaseModel):
    model_config = _FROZEN

    deployments: list[LLMDeployment] = Field(default_factory=list)
    models: list[LLMModel] = Field(default_factory=list)
    tenants: list[LLMTenant] = Field(default_factory=list)
    cache: LLMCacheSettings = LLMCacheSettings()
    limits: LLMLimitSettings = LLMLimitSettings()
    retry: LLMRetrySettings = LLMRetrySettings()
    breaker: BreakerSettings = Field(default_factory=_llm_breaker)
    log_prompts: bool = Field(False, description="put prompts in log lines (never keys)")
    usage_flush_s: float = Field(1.0, gt=0, description="how often usage is written")

    @model_validator(mode="after")
    def _check_names(self) -> LLMSettings:
        deployments = [d.name for d in self.deployments]
        models = [m.name for m in self.models]
        tenants = [t.name for t in self.tenants]
        for kind, names in (("deployment", deployments), ("model", models), ("tenant", tenants)):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"two LLM {kind}s are named {name!r}")
                seen.add(name)
        for model in self.models:
            for dep in model.deployments:
                if dep not in deployments:
                    raise ValueError(f"model {model.name!r} names unknown deployment {dep!r}")
            for fallback in model.fallbacks:
                if fallback not in models or fallback == model.name:
                    raise ValueError(f"model {model.name!r} has invalid fallback {fallback!r}")
        embedder = self.cache.semantic_embeddings
        if embedder is not None and embedder not in models:
            raise ValueError(f"cache.semantic_embeddings names unknown model {embedder!r}")
        return self

    def deployment(self, name: str) -> LLMDeployment:
        return next(d for d in self.deployments if d.name == name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INTERLOCK_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    home: Path = Path(".interlock")
    database_url: str | None = None
    artifacts_dir: Path | None = None
    server: ServerSettings = ServerSettings()
    serving: ServingSettings = ServingSettings()
    cache: CacheSettings = CacheSettings()
    breaker: BreakerSettings = BreakerSettings()
    auth: AuthSettings = AuthSettings()
    log: LogSettings = LogSettings()
    llm: LLMSettings = LLMSettings()
    bus: BusSettings = BusSettings()

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'interlock.db'}"

    @property
    def effective_artifacts_dir(self) -> Path:
        return self.artifacts_dir or self.home / "artifacts"

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with every secret masked."""
        data = self.model_dump(mode="json")
        data["database_url"] = mask_url(self.effective_database_url)
        data["artifacts_dir"] = str(self.effective_artifacts_dir)
        data["cache"]["url"] = mask_url(self.cache.url)
        auth = data["auth"]
        auth["admin_key"] = "********" if self.auth.admin_key else None
        auth["client_keys"] = ["********" for _ in self.auth.client_keys]
        data["llm"]["cache"]["url"] = mask_url(self.llm.cache.url)
        data["llm"]["limits"]["url"] = mask_url(self.llm.limits.url)
        data["bus"]["url"] = mask_url(self.bus.url)
        if self.bus.dedupe_url:
            data["bus"]["dedupe_url"] = mask_url(self.bus.dedupe_url)
        return data


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _config_path(explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return explicit
    from_env = os.environ.get("INTERLOCK_CONFIG")
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from INTERLOCK_CONFIG)")
        return path
    default = Path("interlock.toml")
    return default if default.is_file() else None


class _BusUrlSource(PydanticBaseSettingsSource):
    """``INTERLOCK_BUS_URL``: the short name of ``bus.url``, over ``INTERLOCK_BUS__URL``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        url = os.environ.get("INTERLOCK_BUS_URL")
        return {"bus": {"url": url}} if url else {}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree: ``overrides`` > environment > config file > defaults.

    ``overrides`` are keyword arguments shaped like the tree (``server={"port": 9000}``);
    ``None`` values are ignored so that CLI options left unset do not mask the others.
    """
    path = _config_path(config_file)
    clean = {k: v for k, v in overrides.items() if v is not None}

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [
                init_settings,
                _BusUrlSource(settings_cls),
                env_settings,
            ]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    try:
        return _FileSettings(**clean)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from exc
    except ValueError as exc:  # a TOML syntax error surfaces as a ValueError subclass
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
