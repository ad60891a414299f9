"""Settings for the node and the orchestrator, built once in the CLI and passed down.

Precedence: command-line flag > environment (`DRAGON_*`) > the program's table (`[node]`
or `[orchestrator]`) of `config.toml` in its home (`--home`, else `$DRAGON_HOME`, else
~/.dragonswarm) > default. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dragonswarm.errors import ConfigError

SMALL_MODEL_NAME = "gemma3-270m"
CODER_MODEL_NAME = "qwen2.5-coder-0.5b"
CapMechanism = Literal["auto", "cgroup", "duty", "none"]

_TAGS = re.compile(r"^[a-z][a-z0-9_-]*(,[a-z][a-z0-9_-]*)*$")


class ModelSpec(BaseModel):
    """A model the node can serve: a name clients use, a GGUF path, optional tags."""

    name: str
    path: Path
    tags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse `NAME=PATH[:tag,tag]`, the form of `--model`."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"--model expects NAME=PATH, got {text!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
            raise ConfigError(f"invalid model name {name!r}: use letters, digits, '.', '_', '-', ':'")
        path_text, tags = rest, tuple[str, ...]()
        head, colon, tail = rest.rpartition(":")
        if colon and head and _TAGS.match(tail) and not Path(rest).exists():
            path_text, tags = head, tuple(tail.split(","))
        return cls(name=name, path=Path(path_text).expanduser(), tags=tags)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, checked before any work starts."""

    max_n: int
    max_prompts: int
    max_tokens: int  # per choice
    max_prompt_chars: int  # all prompts or messages together
    default_max_tokens: int  # per choice, when the request sets no limit


def default_home() -> Path:
    return Path(os.environ.get("DRAGON_HOME") or Path.home() / ".dragonswarm")


def default_node_name() -> str:
    """The host name, cut to what the swarm protocol accepts as a node name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:64]
    return name or "node"


CONFIG_TABLES = ("node", "orchestrator")


def config_table(text: str, table: str, fields: set[str], where: str) -> dict[str, Any]:
    """One program's table of a `config.toml` (plain text in, settings out).

    Each program reads its own table, so that a node's `insecure = true` never turns the
    orchestrator sharing its home to plain HTTP. Keys outside a table, unknown tables and
    unknown settings are errors, never silently ignored.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    loose = [key for key, value in data.items() if not isinstance(value, dict)]
    if loose:
        raise ConfigError(f"{where}: {', '.join(loose)} must be under a table, [node] or [orchestrator]")
    unknown_tables = sorted(set(data) - set(CONFIG_TABLES))
    if unknown_tables:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(unknown_tables)}; use [node] or [orchestrator]")
    values: dict[str, Any] = data.get(table, {})
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) in [{table}]: {', '.join(unknown)}")
    return values


class _TableSource(PydanticBaseSettingsSource):
    """`[table]` of `config.toml` in the home in force: `--home`'s, else `$DRAGON_HOME`'s."""

    def __init__(self, settings_cls: type[BaseSettings], table: str, home: Path):
        super().__init__(settings_cls)
        self.table = table
        self.path = home / "config.toml"

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        raise NotImplementedError  # __call__ reads the whole table at once

    def __call__(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"{self.path}: {exc.strerror}") from None
        return config_table(text, self.table, set(self.settings_cls.model_fields), str(self.path))


class _FileSettings(BaseSettings):
    """Flag > environment > the program's table of `config.toml` in its home > default."""

    toml_table: ClassVar[str]  # its table in config.toml

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        given = init_settings()  # the CLI's flags: its --home names the config file
        home = Path(given["home"]).expanduser() if given.get("home") else default_home()
        return (init_settings, env_settings, _TableSource(settings_cls, cls.toml_table, home))


class NodeSettings(_FileSettings):
    """Everything `dragon node` needs."""

    model_config = SettingsConfigDict(env_prefix="DRAGON_", extra="ignore")
    toml_table = "node"

    @property
    def orchestrator_urls(self) -> list[str]:
        """The orchestrator's URL, or each replica's, in the order given."""
        return [u.strip() for u in (self.orchestrator or "").split(",") if u.strip()]

    home: Path = Field(default_factory=default_home)
    name: str = Field(default_factory=default_node_name, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    # The swarm: joined when both are set. The key is a `node` key from `dragon keys create`.
    # Several replicas of one swarm: their URLs separated by commas (tried in turn).
    orchestrator: str | None = None
    key: SecretStr | None = None
    ca: Path | None = None  # the swarm's CA certificate, to verify the orchestrator (DRAGON_CA)
    insecure: bool = False  # allow a plain-http orchestrator: keys and prompts in the clear
    # Required on the local API when it binds beyond loopback (DRAGON_API_KEY).
    api_key: SecretStr | None = None
    # Set by `dragon up`: every process under this pid is the swarm's, not the owner's
    # (on one machine the other workers must not look like a busy owner).
    swarm_pid: int | None = None
    host: str = "127.0.0.1"
    api_port: int = Field(8701, ge=0, le=65535)
    # Host names the local API answers to besides loopback and --host (web/hosts.py).
    allowed_hosts: list[str] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    bundled_model: bool = True  # serve the packaged qwen2.5-coder-0.5b and gemma3-270m

    # Shares of the whole machine (1.0 = every core).
    local_share: float = Field(0.80, gt=0.0, le=1.0)
    share: float = Field(0.10, gt=0.0, le=1.0)
    cap_mechanism: CapMechanism = "auto"
    # Owner activity: CPU used by others above this fraction counts as "owner busy".
    # Below it is background (an IDE, a browser tab, the client reading our stream).
    owner_noise: float = Field(0.10, ge=0.0, le=1.0)
    # When the owner is busy, we leave this much free on top of what the owner uses.
    owner_headroom: float = Field(0.10, ge=0.0, le=1.0)
    min_share: float = Field(0.05, gt=0.0, le=1.0)
    # Sampled four times a second, so the owner's burst is seen and backed off from within
    # a second; the owner counts as busy until `owner_hold_s` after their last busy sample.
    sample_interval: float = Field(0.25, gt=0.0, le=5.0)
    owner_hold_s: float = Field(1.0, ge=0.0, le=60.0)
    # Share of the GPU's memory our model layers may fill (None: the local share).
    gpu_share: float | None = Field(None, ge=0.0, le=1.0)

    idle_unload_s: float = Field(600.0, gt=0.0)
    # A runner that makes no progress this long (no token, no prompt batch) is hung: it is
    # restarted and its job fails (the swarm moves it on). A request that still runs after
    # `request_timeout_s`, waiting included, ends with 504 however fast it goes.
    stall_timeout_s: float = Field(30.0, gt=0.0)
    request_timeout_s: float = Field(1800.0, gt=0.0)
    n_ctx: int = Field(4096, ge=64)  # per sequence
    # Sequences one model process decodes together (continuous batching); None: chosen from
    # the cores, the shares and the free RAM (governor.policy.default_parallel). 1: one at a time.
    parallel: int | None = Field(None, ge=1, le=64)
    ram_margin_mb: int = Field(512, ge=0)

    max_n: int = Field(8, ge=1)
    max_prompts: int = Field(16, ge=1)
    # The model's context is the real bound on the owner's own machine (a clear 400
    # context_length_exceeded); this cap only stops absurd values early.
    max_tokens: int = Field(131_072, ge=1)
    # A request without max_tokens stops here (or where the context ends): no runaway
    # generation that holds the machine for minutes.
    default_max_tokens: int = Field(2048, ge=1)
    max_prompt_chars: int = Field(1_000_000, ge=1)
    max_queue: int = Field(32, ge=0)  # requests waiting per model beyond the running one
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    log_level: str = "info"

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, str):  # DRAGON_MODELS="a=/x.gguf;b=/y.gguf"
            return [ModelSpec.parse(part) for part in value.split(";") if part]
        if isinstance(value, list):
            return [ModelSpec.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @property
    def limits(self) -> Limits:
        return Limits(self.max_n, self.max_prompts, self.max_tokens, self.max_prompt_chars,
                      min(self.default_max_tokens, self.max_tokens))

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def lending_path(self) -> Path:
        """The owner's lending switch (`node.lending`), kept across restarts."""
        return self.home / "lending.json"


class OrchestratorSettings(_FileSettings):
    """Everything `dragon orchestrator` needs."""

    # populate_by_name: `redis` is read from the environment under its aliases only, so a flag
    # and config.toml still give it by its name.
    model_config = SettingsConfigDict(env_prefix="DRAGON_ORCHESTRATOR_", extra="ignore", populate_by_name=True)
    toml_table = "orchestrator"

    home: Path = Field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = Field(8700, ge=0, le=65535)
    insecure: bool = False  # serve plain http: only with an explicit --insecure
    # A Redis that replicas share (keys, node identities and records, usage, rate limits), as
    # redis://[:PASSWORD@]HOST:PORT/DB or rediss:// for TLS; None: the SQLite file under home,
    # for one process. Also DRAGON_REDIS. It holds a password: only `store.redis.redacted(url)`
    # may be printed or logged.
    redis: SecretStr | None = Field(None, validation_alias=AliasChoices("DRAGON_REDIS", "DRAGON_ORCHESTRATOR_REDIS"))

    max_queue: int = Field(1024, ge=1)  # fragments waiting, all users together
    # The most one user (key) may have waiting; less as more users wait (max_queue / users), and
    # users already waiting keep one more user's share free (scheduler/fairqueue.py).
    max_queue_per_user: int = Field(256, ge=1)
    # A fragment whose worker made no progress (no token; model loading and prompt reading
    # report progress) for `stall_timeout_s` moves to another worker; a request that still
    # runs after `request_timeout_s`, queueing included, ends with 504 however fast it goes.
    request_timeout_s: float = Field(1800.0, gt=0.0)
    stall_timeout_s: float = Field(30.0, gt=0.0)
    max_attempts: int = Field(4, ge=1)  # workers a fragment may try before it fails
    heartbeat_s: float = Field(1.0, gt=0.0)
    # A node with nothing running that changes nothing may report this rarely (the stale and gone
    # times below stretch for it by the same factor): ten thousand idle nodes beat a fifth as often.
    idle_heartbeat_s: float = Field(5.0, gt=0.0)
    # Fragments one node may run at once, whatever it claims (its model processes' sequences).
    max_node_capacity: int = Field(8, ge=1, le=64)
    # Tokens/s each stream must keep when a node runs several at once: more go to a node only while
    # its measured rate allows (0: fill every sequence). 14 = 0.5 s per line of code at 6.8 tokens
    # per line, as the bundled code model writes them (bench/results/code.md).
    min_stream_tps: float = Field(14.0, ge=0.0)
    stale_after_s: float = Field(3.5, gt=0.0)  # no heartbeat this long: not given new work
    gone_after_s: float = Field(15.0, gt=0.0)  # ... this long: connection closed, work moved

    max_n: int = Field(8, ge=1)
    max_prompts: int = Field(16, ge=1)
    max_tokens: int = Field(4096, ge=1)  # the most one choice may ask for
    default_max_tokens: int = Field(2048, ge=1)  # ... and what it gets when it asks nothing (capped by max_tokens)
    max_prompt_chars: int = Field(200_000, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # Per key, per minute (0: no limit). Tokens are charged as prompt characters plus
    # max_tokens at admission; what a request did not use is given back when it ends.
    rate_rpm: int = Field(600, ge=0)
    rate_tpm: int = Field(2_000_000, ge=0)
    max_message_bytes: int = Field(1 << 20, ge=1024)  # one WebSocket message from a node
    # The response cache (orchestrator/cache.py): the answer to a request that determines it
    # (temperature 0, or a seed) is kept this long and replayed to the same key; in the Redis with
    # `redis`, else in responses.db under home, at most `cache_max_mb` there, the oldest out first.
    response_cache: bool = True
    cache_ttl_s: float = Field(3600.0, gt=0.0)
    cache_shared: bool = False  # one cache for every key (callers who may see each other's answers)
    cache_max_mb: int = Field(256, ge=1)
    log_level: str = "info"

    @field_validator("redis", mode="before")
    @classmethod
    def _no_redis_when_empty(cls, value: object) -> object:
        """An empty URL (DRAGON_REDIS= to unset a config file's) means no Redis, not a URL to reject."""
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @property
    def limits(self) -> Limits:
        return Limits(self.max_n, self.max_prompts, self.max_tokens, self.max_prompt_chars,
                      min(self.default_max_tokens, self.max_tokens))

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def db_path(self) -> Path:
        return self.home / "state.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"
