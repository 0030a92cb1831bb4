"""Settings: built-in defaults < TOML config file < ``DISTILLERY_*`` env vars < CLI flags.

The CLI resolves flags and environment variables (click's ``envvar=``) and hands
only the values that were actually given to :func:`load_settings`, which layers
them over the config file.  Unknown keys in the file are errors, so a typo never
silently turns a feature off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.core.errors import ConfigError

DEFAULT_UPSTREAM = "https://api.openai.com/v1"


def data_dir() -> Path:
    """Where the database and spool live unless configured otherwise."""
    env = os.environ.get("DISTILLERY_DATA_DIR")
    return Path(env) if env else Path(platformdirs.user_data_dir("distillery"))


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("distillery")) / "distillery.toml"


FINGERPRINT = re.compile(r"^key-[0-9a-f]{16}$")


def key_fingerprint(api_key: str) -> str:
    """A stable, irreversible name for an API key: what we store instead of the key.

    A fingerprint names a key; it never works as one.  Keys are only ever
    compared by fingerprinting what the caller presented (see
    :class:`AuthSettings`), so presenting a fingerprint -- which is in logs, the
    database and the config file -- is just presenting an unknown key.
    """
    return "key-" + hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _fingerprints(entries: tuple[str, ...]) -> frozenset[str]:
    """Config entries (keys or their fingerprints) as fingerprints."""
    return frozenset(e if FINGERPRINT.match(e) else key_fingerprint(e) for e in entries)


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    return pattern


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxySettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    max_body_mb: float = Field(100, gt=0, description="largest chat completion request body")
    access_log: bool = True
    shutdown_timeout: float = Field(60, ge=0, description="seconds in-flight requests get on stop")
    body_timeout: float = Field(
        60, gt=0, description="seconds a client gets to send a chat completion's body"
    )
    # Serve OpenAI's stored-completions API (list/retrieve/update/delete/messages)
    # from the local store, or pass those routes to the upstream.
    stored_completions: Literal["local", "upstream"] = "local"


class UpstreamSettings(_Section):
    url: str = DEFAULT_UPSTREAM
    api_key: str | None = None
    api_key_env: str | None = None
    store: bool = True
    metadata: bool = True
    stream_usage: bool = True
    timeout: float = Field(600, gt=0, description="seconds to wait for the next byte")
    connect_timeout: float = Field(10, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/]+", value):
            raise ValueError(f"must be an http(s) URL like {DEFAULT_UPSTREAM}, got {value!r}")
        return value.rstrip("/")

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


class AuthSettings(_Section):
    # Keys clients must present when the proxy holds the upstream key.  Either
    # the key itself or its fingerprint (`distillery key-fingerprint`), so the
    # config file need not hold secrets.
    keys: list[str] = []
    # Keys (or fingerprints) that see every tenant's stored completions.
    admin_keys: list[str] = []

    def accepts(self, api_key: str) -> bool:
        return key_fingerprint(api_key) in _fingerprints(tuple(self.keys))

    def is_admin(self, api_key: str) -> bool:
        return key_fingerprint(api_key) in _fingerprints(tuple(self.admin_keys))


class UISettings(_Section):
    """The dashboard at /ui/ (``distillery ui`` serves it alone)."""

    enabled: bool = True
    # No sign-in: one user, whoever can reach 127.0.0.1.  Refused on any other address.
    open: bool = False
    session_hours: float = Field(12, gt=0)
    # A session not used for this long ends (the next page asks to sign in again).
    idle_minutes: float = Field(60, gt=0)


class StorageSettings(_Section):
    database_url: str | None = None
    data_dir: str | None = None

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else data_dir()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir() / 'distillery.db'}"


class SampleRule(_Section):
    tag: str
    rate: float = Field(ge=0, le=1)

    @field_validator("tag")
    @classmethod
    def _key_value(cls, value: str) -> str:
        if "=" not in value:
            raise ValueError(f"must look like key=value, got {value!r}")
        return value


class CaptureSettings(_Section):
    enabled: bool = True
    sample_rate: float = Field(1.0, ge=0, le=1)
    sample: list[SampleRule] = []
    # No longer used (the writer process reads the spool, there is no queue); accepted so
    # that a config written for an earlier version still loads.
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(500, ge=1)
    flush_interval: float = Field(0.05, gt=0)
    # Records the spool could not take (disk full) wait in memory up to this
    # size; beyond it a record is dropped (logged with its id, counted).
    memory_buffer_mb: float = Field(256, gt=0)


class FingerprintSettings(_Section):
    enabled: bool = True
    key: str = "prompt_fp"


class TagRule(_Section):
    model: str | None = None
    text: str | None = None
    set: dict[str, str]

    @model_validator(mode="after")
    def _valid(self) -> TagRule:
        if self.model is None and self.text is None:
            raise ValueError("a rule needs `model` or `text` (a regular expression)")
        for pattern in (self.model, self.text):
            if pattern is not None:
                _regex(pattern)
        return self


class RedactPattern(_Section):
    name: str
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        return _regex(value)


class RedactSettings(_Section):
    defaults: bool = True
    patterns: list[RedactPattern] = []


class TaggingSettings(_Section):
    header_prefix: str = "X-Distillery-Tag-"
    app_key: str = "app"


class EndpointSettings(_Section):
    """A named OpenAI-compatible server for evals: ``--model NAME@endpoint``."""

    base_url: str
    api_key_env: str | None = None

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class RouteMatch(_Section):
    """Which calls a route covers: every condition given must hold (the tagging matchers)."""

    app: str | None = None
    tags: dict[str, str] = {}
    fingerprint: str | None = None  # the prompt fingerprint (`prompt_fp`)
    model: str | None = None  # the model the client asked for
    tenants: list[str] = []  # API-key fingerprints; empty: any
    all: bool = False  # say so to cover every call (an empty match is refused as a mistake)

    def covers_everything(self) -> bool:
        return not (self.app or self.tags or self.fingerprint or self.model or self.tenants)


MIN_AUTO_HOLDOUT = 0.05  # of an `on` route's calls, kept by the teacher and graded


class RouteSettings(_Section):
    """``[routes.NAME]``: a student beside the teacher on the calls a route covers.

    Modes: ``shadow`` (the teacher answers; the student is called beside it and graded
    against the teacher's answer), ``canary`` (the student answers a fraction), ``on``
    (the student answers all but a holdout, which stays in shadow), ``off``.
    """

    match: RouteMatch
    student: str = Field(description="MODEL@ENDPOINT, the endpoint from [endpoints.NAME]")
    graders: list[str] = Field(min_length=1)
    bar: float = Field(ge=0)
    # How sure promotion and demotion must be: the chance that a student at or below the
    # bar is ever promoted, watched for however long, is at most 1 - confidence.
    confidence: float = Field(0.95, ge=0.5, lt=1)
    # Failed student calls (errors, timeouts) score 0; beyond this share of the evidence
    # the route is not promoted, and a serving one goes back to shadow.
    max_error_rate: float = Field(0.05, ge=0, le=1)
    # Keep the configured mode whatever the database says: commands and the automatic
    # policy leave a pinned route alone, and a reload applies its mode at once.
    pin: bool = False
    # The bar as a fraction of the teacher's score (the teacher's answer graded against
    # itself is 1 for every reference grader, so this is the same as an absolute bar there).
    relative: bool = False
    min_samples: int = Field(50, ge=1)
    window: int = Field(
        500, ge=1, description="the newest pairs for latency, cost and the drift detector"
    )
    mode: Literal["shadow", "canary", "on", "off"] = "shadow"
    canary: float = Field(0.1, gt=0, le=1, description="the fraction the student answers")
    holdout: float = Field(0.05, ge=0, lt=1, description="the fraction the teacher keeps, on")
    auto: bool = False  # promote and demote on the graded evidence, without a command
    # What the student's answer must be, else the teacher answers: "json" (content that
    # parses), "auto" (JSON when the request asks for a JSON response_format), "none".
    validator: Literal["auto", "json", "none"] = "auto"
    down_after: float = Field(
        120, gt=0, description="seconds of student failures before the teacher takes over"
    )
    concurrency: int = Field(4, ge=1, description="student calls in flight for shadowing")
    queue: int = Field(100, ge=1, description="shadow calls waiting; beyond it they are dropped")
    timeout: float = Field(10, gt=0, description="seconds to connect, then between bytes")
    total_timeout: float = Field(
        120, gt=0, description="seconds for a student's whole answer, streamed or not"
    )
    # Who answers a call, decided by a stable hash of: "conversation" (the first user
    # message, so every turn of one conversation gets the same model), "user" (OpenAI's
    # `user` field), "key" (the API key's fingerprint), "tag:KEY" (a tag's value), or
    # "none" (a coin per call).  A call without the key is decided by its conversation.
    sticky: str = Field("conversation", pattern=r"^(conversation|user|key|none|tag:.+)$")
    # "tag:KEY": each value of the tag is a slice that must clear the bar on its own (a
    # student wrong on one slice is not promoted for the whole route); demotion when any
    # slice falls below it.
    by: str | None = Field(None, pattern=r"^tag:.+$")

    @model_validator(mode="after")
    def _student_names_an_endpoint(self) -> RouteSettings:
        model, _, endpoint = self.student.partition("@")
        if not model or not endpoint:
            raise ValueError(
                f"student {self.student!r} must be MODEL@ENDPOINT, with the endpoint in "
                "[endpoints.NAME] (a route never sends the teacher's key to a student)"
            )
        return self

    @model_validator(mode="after")
    def _no_likely_mistakes(self) -> RouteSettings:
        """What parses but cannot be meant: each said with its fix."""
        if self.bar > 1:
            raise ValueError(
                f"bar = {self.bar:g}: a bar is a score from 0 to 1 "
                f"(bar = {self.bar / 100:g} for {self.bar:g}%)"
            )
        if self.match.covers_everything() and not self.match.all:
            raise ValueError(
                "match is empty, which covers every call: name what the route covers "
                "(app, tags, fingerprint, model, tenants), or say match = { all = true }"
            )
        if self.auto and self.holdout < MIN_AUTO_HOLDOUT and not self.pin:
            raise ValueError(
                f"auto = true needs holdout >= {MIN_AUTO_HOLDOUT}: serving, only the holdout "
                "is graded, and with less the policy cannot see a student get worse"
            )
        return self


class Price(_Section):
    """USD per million tokens: answered (input, output) and, for fine-tuning, trained."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    training: float | None = Field(None, ge=0)


class Settings(_Section):
    proxy: ProxySettings = ProxySettings()
    upstream: UpstreamSettings = UpstreamSettings()
    auth: AuthSettings = AuthSettings()
    ui: UISettings = UISettings()
    storage: StorageSettings = StorageSettings()
    capture: CaptureSettings = CaptureSettings()
    tagging: TaggingSettings = TaggingSettings()
    tags: dict[str, str] = {}
    apps: dict[str, str] = {}
    fingerprint: FingerprintSettings = FingerprintSettings()
    rules: list[TagRule] = []
    redact: RedactSettings = RedactSettings()
    endpoints: dict[str, EndpointSettings] = {}
    prices: dict[str, Price] = {}
    routes: dict[str, RouteSettings] = {}

    def identify(self, api_key: str) -> tuple[str, bool] | None:
        """(tenant, admin) for a presented key; ``None`` when this deployment refuses it.

        With an upstream key configured, callers must present one of the proxy's keys;
        without one, any key is its own tenant.  Either way the tenant is the key's
        fingerprint, and admin keys see every tenant.
        """
        if not api_key:
            return None
        admin = self.auth.is_admin(api_key)
        if self.upstream.resolved_api_key() and not (admin or self.auth.accepts(api_key)):
            return None
        return key_fingerprint(api_key), admin

    def still_signs_in(self, tenant: str, admin: bool) -> bool:
        """Whether a session started as (``tenant``, ``admin``) would be started now: a key
        removed from ``[auth]`` (or no longer an admin's) ends its sessions."""
        admins = _fingerprints(tuple(self.auth.admin_keys))
        if admin:
            return tenant in admins
        if self.upstream.resolved_api_key():
            return tenant in admins or tenant in _fingerprints(tuple(self.auth.keys))
        return True

    @model_validator(mode="after")
    def _open_ui_only_on_loopback(self) -> Settings:
        if self.ui.open and self.proxy.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(
                f"ui.open serves the dashboard without sign-in, so only on 127.0.0.1, not on "
                f"{self.proxy.host}. Remove ui.open, or bind the proxy to 127.0.0.1."
            )
        return self

    @model_validator(mode="after")
    def _routes_name_known_endpoints(self) -> Settings:
        for name, route in self.routes.items():
            endpoint = route.student.partition("@")[2]
            if endpoint not in self.endpoints:
                raise ValueError(
                    f"routes.{name}: no endpoint {endpoint!r}; add [endpoints.{endpoint}] "
                    'base_url = "..."'
                )
        return self

    @model_validator(mode="after")
    def _no_open_relay(self) -> Settings:
        if self.upstream.resolved_api_key() and not (self.auth.keys or self.auth.admin_keys):
            raise ValueError(
                "upstream.api_key is set but auth.keys is empty: anyone who can reach the "
                "proxy would spend your key. Add proxy keys under [auth] keys = [...] "
                "(or in DISTILLERY_KEYS)"
            )
        return self


def config_file(config_path: Path | None = None) -> Path | None:
    """The config file :func:`load_settings` reads, or ``None`` when it reads none."""
    path = config_path or Path(os.environ.get("DISTILLERY_CONFIG") or default_config_path())
    return path if path.exists() else None


# The keys apps and admins call with, from the environment or a file (a container's
# secret), in place of [auth] keys / admin_keys: keys or fingerprints, one per line or
# separated by commas.  A deployment keeps them out of the config file it mounts.
KEY_VARIABLES = {"DISTILLERY_KEYS": "auth.keys", "DISTILLERY_ADMIN_KEYS": "auth.admin_keys"}


def keys_from_environment() -> dict[str, list[str]]:
    """``auth.keys`` and ``auth.admin_keys`` from ``DISTILLERY_KEYS`` and
    ``DISTILLERY_ADMIN_KEYS``, or from the files ``DISTILLERY_KEYS_FILE`` and
    ``DISTILLERY_ADMIN_KEYS_FILE`` name (Docker and Kubernetes secrets)."""
    found: dict[str, list[str]] = {}
    for variable, dotted in KEY_VARIABLES.items():
        text = os.environ.get(variable)
        path = os.environ.get(f"{variable}_FILE")
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                problem = f"Cannot read {variable}_FILE ({path}): {exc.strerror}."
                raise ConfigError(problem) from None
        if text is not None:
            keys = [key for key in text.replace(",", "\n").split() if key]
            if not keys:
                raise ConfigError(f"{variable} is set but names no key.")
            found[dotted] = keys
    return found


def load_settings(
    config_path: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build settings from the config file (if any) and dotted-key overrides.

    ``overrides`` maps dotted names such as ``"proxy.port"`` to values given on
    the command line or in the environment; ``None`` values are ignored.
    """
    explicit = config_path is not None
    path = config_path or Path(os.environ.get("DISTILLERY_CONFIG") or default_config_path())
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read config file {path}: {exc}") from None
    elif explicit or os.environ.get("DISTILLERY_CONFIG"):
        raise ConfigError(f"Config file {path} does not exist.")
    for dotted, value in {**keys_from_environment(), **(overrides or {})}.items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        raw.setdefault(section, {})[name] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"Invalid configuration ({path}): {problems}") from None
