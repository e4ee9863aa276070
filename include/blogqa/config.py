"""Settings read from the environment into one frozen object.

Every component (CLI, DAG tasks, API) reads the same variables, so a value set once in the
shell, in Airflow's environment or in docker-compose applies everywhere.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from blogqa.errors import ConfigError

# Model requests in flight per task: twice a pool slot's share of BLOGQA_LLM_MAX_IN_FLIGHT
# (4 slots, 32), so a task can take up the requests that the other tasks leave unused while they
# crawl, validate or load; the shared cap keeps the total at 32. At 8 (an exact share) a task
# was held to 8 while the cap sat partly idle. N = 500 under CeleryExecutor, three runs each:
# 38.1-39.4 s at 8, 37.6-38.5 s at 16 (bench/README.md, fifth round). The whole cap per task
# (32, so one chunk crawled at a time) made runs of one round of chunks faster and runs of
# several rounds slower (bench/README.md, fifteenth round).
DEFAULT_LLM_CONCURRENCY = 16

# Most URLs per mapped chunk, chosen with bench/pipeline_throughput.py (bench/README.md,
# "Chunk size"): every chunk costs two task processes (each parses the DAG and imports the
# pipeline; enrich imports Great Expectations too), so on a small machine fewer, larger
# chunks finish sooner. Under the scheduler the chunks still come in whole rounds of the
# `blogqa_llm` pool's slots (`pipeline.plan_chunks`): 500 URLs with 4 slots are 4 chunks of
# 125 (under `blogqa run`, one task at a time, 2 chunks of 250).
DEFAULT_CHUNK_SIZE = 250
# Waves per chunk in the enrich task (blogqa.waves): with 2, the first half of a chunk's saved
# summaries is embedded, validated and loaded while the rest is summarized. It pays when the
# model is what a run waits for (3 s per chat call: runs 4-13 % faster) and not on a machine
# whose cores the loads already fill (0.8 s per call on 2 cores: no faster, ~10 % more CPU;
# each wave costs a validation, about 0.3 CPU s of Great Expectations, and statements per
# stage). bench/README.md, sixteenth round. 1: each stage over the whole chunk.
DEFAULT_ENRICH_WAVES = 1
MAX_URLS_PER_RUN = 10_000
MAX_CHUNKS_PER_RUN = 256  # well inside Airflow's max_map_length (1024)

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
# hnsw.ef_search of the vector searches: the smallest value meeting the recall@10 >= 0.95
# target in bench/api_bench.py (bench/README.md has the sweep); pgvector's own default falls
# well short of it.
HNSW_EF_SEARCH_DEFAULT = 100


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: use true or false.")


def _env_int(name: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer.") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name}={value} must be at least {minimum}{upper}.")
    return value


def _env_limit(name: str) -> int | None:
    """An optional positive limit: unset or empty means no limit."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return _env_int(name, 0, minimum=1)


def _env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}.")
    return value


def _env_networks(name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated CIDRs the crawler may reach although they are not public."""
    raw = os.environ.get(name, "")
    networks = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(
                f"{name}: {part!r} is not an IP network; use CIDRs like 10.0.0.0/8,127.0.0.1/32."
            ) from None
    return tuple(networks)


def _env_origins(name: str) -> tuple[str, ...]:
    """Comma-separated origins (scheme://host[:port]) allowed to call the API from a browser
    (the widget on a publisher's pages), or `*` for any."""
    origins = []
    for part in filter(None, (p.strip() for p in os.environ.get(name, "").split(","))):
        scheme, sep, rest = part.partition("://")
        if part != "*" and (
            scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/")
        ):
            raise ConfigError(
                f"{name}: {part!r} is not an origin; use e.g. https://blog.example.com,"
                "http://127.0.0.1:8000 (or *)."
            )
        origins.append(part.rstrip("/"))
    return tuple(origins)


def _normalize_dsn(url: str) -> str:
    """psycopg wants libpq URLs; accept SQLAlchemy-style `postgresql+psycopg://` too."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Settings:
    """All tunables; `load_settings()` builds it from the environment."""

    home: Path
    database_url: str | None
    llm_provider: str
    chat_model: str
    embed_model: str
    embed_dim: int
    llm_concurrency: int
    # shared by every task on every worker (blogqa.limits): in flight per endpoint (every
    # model's requests together), rates per model of the endpoint
    llm_max_in_flight: int  # 0: no shared cap
    llm_rpm: int | None  # None: no requests/min limit
    llm_tpm: int | None  # None: no tokens/min limit
    crawl_concurrency: int
    crawl_allow_private: bool
    crawl_allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    respect_robots: bool
    robots_ttl_seconds: int
    per_host_concurrency: int
    max_crawl_delay: float
    fetch_timeout: float
    llm_timeout: float
    llm_max_retries: int
    breaker_threshold: int
    breaker_cooldown: float
    llm_pool_slots: int
    extract_timeout: float
    extract_workers: int
    stage_stall_seconds: float
    embed_timeout: float
    load_timeout: float
    load_parallelism: int
    load_batch: int
    enrich_waves: int  # 1: each enrich stage over the whole chunk (blogqa.waves)
    max_page_bytes: int
    max_redirects: int
    max_attempts: int
    retry_base_seconds: float
    lease_seconds: int
    input_token_budget: int
    chunk_tokens: int
    chunk_overlap_tokens: int
    embed_batch_size: int
    hnsw_ef_search: int
    user_agent: str
    # the standalone API (`blogqa serve`): per-client rate limit (0 = off) and CORS origins
    api_rate_limit_per_minute: int = 600
    api_rate_burst: int = 60
    api_cors_origins: tuple[str, ...] = ()
    # BLOGQA_LLM_MODE: `sync` (one Chat Completions call per page) or `batch` (the OpenAI
    # Batch API, about half the price, results within 24 h; blogqa.batch), and how often a
    # waiting batch is polled
    llm_mode: str = "sync"
    batch_poll_seconds: float = 60.0

    @property
    def embedded(self) -> bool:
        """True when no server is configured and the bundled PostgreSQL is used."""
        return self.database_url is None

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def offline(self) -> bool:
        return self.llm_provider == "local"


def _llm_provider() -> str:
    raw = os.environ.get("BLOGQA_LLM_PROVIDER", "").strip().lower()
    if raw in ("local", "openai"):
        return raw
    if raw:
        raise ConfigError(f"BLOGQA_LLM_PROVIDER={raw!r}: use 'openai' or 'local'.")
    has_endpoint = os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL")
    return "openai" if has_endpoint else "local"


LLM_MODES = ("sync", "batch")


def _llm_mode(provider: str) -> str:
    """BLOGQA_LLM_MODE, validated: batch mode exists for the OpenAI provider only."""
    raw = os.environ.get("BLOGQA_LLM_MODE", "").strip().lower() or "sync"
    return checked_llm_mode(raw, provider, source="BLOGQA_LLM_MODE")


def checked_llm_mode(mode: str, provider: str, *, source: str) -> str:
    """`mode` if it is one of LLM_MODES that `provider` can do; ConfigError naming `source`
    (the variable or the run param it came from) otherwise."""
    if mode not in LLM_MODES:
        raise ConfigError(f"{source}={mode!r}: use 'sync' or 'batch'.")
    if mode == "batch" and provider != "openai":
        raise ConfigError(
            f"{source}=batch needs the OpenAI provider (BLOGQA_LLM_PROVIDER=openai): "
            "the offline provider has no Batch API."
        )
    return mode


def _stall_seconds(*timeouts: tuple[str, float]) -> float:
    """BLOGQA_STAGE_STALL_SECONDS, which must outlast every per-item timeout: a watchdog that
    fired first would fail healthy tasks whose items are merely slow."""
    name = "BLOGQA_STAGE_STALL_SECONDS"
    value = _env_float(name, 300.0, minimum=1.0)
    for other, limit in timeouts:
        if value <= limit:
            raise ConfigError(f"{name}={value:g} must be more than {other}={limit:g}.")
    return value


def llm_pool_slots() -> int:
    """BLOGQA_LLM_POOL_SLOTS: model-calling tasks at once (the `blogqa_llm` pool's slots).
    On its own because the DAG file reads it when parsed, without the other settings."""
    return _env_int("BLOGQA_LLM_POOL_SLOTS", 4, maximum=1024)


def crawls_at_once() -> int:
    """BLOGQA_CRAWLS_AT_ONCE: chunks of a DAG run crawled at once (`max_active_tis_per_dagrun`
    of the crawl task, read when the DAG file is parsed). By default just enough crawled
    chunks to fill the model endpoint's shared cap (BLOGQA_LLM_MAX_IN_FLIGHT over
    BLOGQA_LLM_CONCURRENCY, rounded up; the pool's slots when there is no cap), at most the
    pool's slots: the first chunks reach their model calls sooner, and the rest are crawled
    beside those calls instead of before them."""
    slots, cap = llm_pool_slots(), llm_max_in_flight()
    filling = min(slots, -(-cap // llm_concurrency())) if cap else slots
    return _env_int("BLOGQA_CRAWLS_AT_ONCE", filling, maximum=1024)


def llm_concurrency() -> int:
    """BLOGQA_LLM_CONCURRENCY: model requests in flight per task."""
    return _env_int("BLOGQA_LLM_CONCURRENCY", DEFAULT_LLM_CONCURRENCY, maximum=256)


def llm_max_in_flight() -> int:
    """BLOGQA_LLM_MAX_IN_FLIGHT: model requests in flight to the endpoint across every task
    and worker (0: no shared cap)."""
    return _env_int("BLOGQA_LLM_MAX_IN_FLIGHT", 32, minimum=0, maximum=100_000)


def load_settings() -> Settings:
    """Read every BLOGQA_* variable (and the OpenAI ones) once, validating as it goes."""
    home = Path(os.environ.get("BLOGQA_HOME") or ".blogqa").expanduser().resolve()
    url = os.environ.get("BLOGQA_DATABASE_URL", "").strip() or None
    provider = _llm_provider()
    fetch_timeout = _env_float("BLOGQA_FETCH_TIMEOUT_SECONDS", 20.0, minimum=0.1)
    llm_timeout = _env_float("BLOGQA_LLM_TIMEOUT_SECONDS", 60.0, minimum=0.1)
    extract_timeout = _env_float("BLOGQA_EXTRACT_TIMEOUT_SECONDS", 30.0, minimum=0.1)
    default_chat = "local-extractive-v1" if provider == "local" else "gpt-4o-mini"
    default_embed = "local-hash-v1" if provider == "local" else "text-embedding-3-small"
    return Settings(
        home=home,
        database_url=_normalize_dsn(url) if url else None,
        llm_provider=provider,
        chat_model=os.environ.get("BLOGQA_CHAT_MODEL") or default_chat,
        embed_model=os.environ.get("BLOGQA_EMBED_MODEL") or default_embed,
        embed_dim=_env_int("BLOGQA_EMBED_DIM", 1536, minimum=8, maximum=2000),
        llm_concurrency=llm_concurrency(),
        llm_max_in_flight=llm_max_in_flight(),
        llm_rpm=_env_limit("BLOGQA_LLM_RPM"),
        llm_tpm=_env_limit("BLOGQA_LLM_TPM"),
        crawl_concurrency=_env_int("BLOGQA_CRAWL_CONCURRENCY", 16, maximum=256),
        crawl_allow_private=_env_bool("BLOGQA_CRAWL_ALLOW_PRIVATE", False),
        crawl_allow_networks=_env_networks("BLOGQA_CRAWL_ALLOW_NETWORKS"),
        respect_robots=_env_bool("BLOGQA_RESPECT_ROBOTS", True),
        robots_ttl_seconds=_env_int("BLOGQA_ROBOTS_TTL_SECONDS", 3600, minimum=0),
        per_host_concurrency=_env_int("BLOGQA_PER_HOST_CONCURRENCY", 2, maximum=64),
        max_crawl_delay=_env_float("BLOGQA_MAX_CRAWL_DELAY_SECONDS", 30.0),
        fetch_timeout=fetch_timeout,
        llm_timeout=llm_timeout,
        llm_max_retries=_env_int("BLOGQA_LLM_MAX_RETRIES", 2, minimum=0, maximum=10),
        breaker_threshold=_env_int("BLOGQA_LLM_BREAKER_THRESHOLD", 5, maximum=1000),
        breaker_cooldown=_env_float("BLOGQA_LLM_BREAKER_COOLDOWN_SECONDS", 60.0),
        llm_pool_slots=llm_pool_slots(),
        extract_timeout=extract_timeout,
        extract_workers=_env_int("BLOGQA_EXTRACT_WORKERS", os.cpu_count() or 1, maximum=64),
        stage_stall_seconds=_stall_seconds(
            ("BLOGQA_FETCH_TIMEOUT_SECONDS", fetch_timeout),
            ("BLOGQA_LLM_TIMEOUT_SECONDS", llm_timeout),
            ("BLOGQA_EXTRACT_TIMEOUT_SECONDS", extract_timeout),
        ),
        embed_timeout=_env_float("BLOGQA_EMBED_TIMEOUT_SECONDS", 60.0, minimum=0.1),
        load_timeout=_env_float("BLOGQA_LOAD_TIMEOUT_SECONDS", 60.0, minimum=0.1),
        load_parallelism=_env_int("BLOGQA_LOAD_PARALLELISM", os.cpu_count() or 1, maximum=32),
        load_batch=_env_int("BLOGQA_LOAD_BATCH", 32, maximum=10000),
        enrich_waves=_env_int("BLOGQA_ENRICH_WAVES", DEFAULT_ENRICH_WAVES, maximum=64),
        max_page_bytes=_env_int("BLOGQA_MAX_PAGE_BYTES", 10 * 1024 * 1024, minimum=1024),
        max_redirects=_env_int("BLOGQA_MAX_REDIRECTS", 5, minimum=0, maximum=30),
        max_attempts=_env_int("BLOGQA_MAX_ATTEMPTS", 5, maximum=100),
        retry_base_seconds=_env_float("BLOGQA_RETRY_BASE_SECONDS", 30.0),
        lease_seconds=_env_int("BLOGQA_LEASE_SECONDS", 900, minimum=5),
        input_token_budget=_env_int("BLOGQA_INPUT_TOKEN_BUDGET", 6000, minimum=200),
        chunk_tokens=_env_int("BLOGQA_CHUNK_TOKENS", 300, minimum=32, maximum=8000),
        chunk_overlap_tokens=_env_int("BLOGQA_CHUNK_OVERLAP_TOKENS", 40, minimum=0),
        embed_batch_size=_env_int("BLOGQA_EMBED_BATCH_SIZE", 256, maximum=2048),
        hnsw_ef_search=_env_int("BLOGQA_HNSW_EF_SEARCH", HNSW_EF_SEARCH_DEFAULT, maximum=1000),
        user_agent=os.environ.get("BLOGQA_USER_AGENT")
        or "blogqa/0.1 (question/answer dataset builder)",
        api_rate_limit_per_minute=_env_int(
            "BLOGQA_API_RATE_LIMIT_PER_MINUTE", 600, minimum=0, maximum=1_000_000
        ),
        api_rate_burst=_env_int("BLOGQA_API_RATE_BURST", 60, maximum=100_000),
        api_cors_origins=_env_origins("BLOGQA_API_CORS_ORIGINS"),
        llm_mode=_llm_mode(provider),
        batch_poll_seconds=_env_float("BLOGQA_BATCH_POLL_SECONDS", 60.0, minimum=0.01),
    )
