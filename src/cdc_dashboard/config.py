"""Settings from `CDC_*` environment variables (and `.env`), validated once at start-up.

A wrong value must stop the program with one line that names the variable; `load_settings` turns pydantic's
ValidationError into a `ConfigError` whose message is that line.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ConfigError", "Settings", "load_settings", "signing_secret"]


# Values never echoed back in an error: they are secrets.
_SENSITIVE = {
    "secret",
    "secret_previous",
    "admin_secret",
    "paystack_secret_key",
    "mpesa_callback_token",
    "database_url",
}


def _comma_separated(value: Any) -> Any:
    """A list variable's entries: split on commas when it came as one string, stripped, blanks dropped; anything
    that is not a list is left for pydantic to refuse."""
    entries = value.split(",") if isinstance(value, str) else value
    if not isinstance(entries, list):
        return entries
    return [str(e).strip() for e in entries if str(e).strip()]


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message is one line meant for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDC_", env_file=".env", extra="ignore")

    database_url: str | None = Field(default=None, description="PostgreSQL URL; unset: `run` embeds one")
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    secret: str | None = Field(default=None, description="HS256 key that signs dashboard tokens")
    # Key rotation: earlier CDC_SECRETs, comma-separated, whose tokens are still accepted; never used to sign.
    secret_previous: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # When set, admin tokens are signed with this key and only with it.
    admin_secret: str | None = Field(default=None, description="HS256 key that signs admin tokens")
    paystack_secret_key: str | None = None
    mpesa_callback_token: str | None = None
    # Comma-separated addresses or CIDR blocks. Empty allow-list: any source (the path token still applies).
    mpesa_allowed_ips: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Proxies whose X-Forwarded-For is believed when checking the allow-list (e.g. the local nginx).
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sse_ping_seconds: float = Field(default=15.0, gt=0)
    max_connections: int = Field(default=20000, ge=1)
    max_streams_per_token: int = Field(default=10, ge=1, description="open streams one token may hold on one gateway")
    refresh_cooldown_seconds: float = Field(
        default=10.0, ge=0, le=86400, description="a business's manual refresh runs at most once per this (per gateway)"
    )
    # Token buckets per client address (0 = off). Generous on purpose: a provider's burst of callbacks, or every
    # dashboard of an office behind one NAT reconnecting after a deploy, must never meet them.
    rate_limit_webhooks_per_minute: int = Field(default=6000, ge=0, le=1_000_000)
    rate_limit_stream_opens_per_minute: int = Field(default=1200, ge=0, le=1_000_000)
    sse_queue_size: int = Field(default=256, ge=1, description="events buffered per stream before it is cut")
    sse_replay_memory_events: int = Field(default=10000, ge=0, description="latest events kept for resuming streams")
    sse_send_timeout_seconds: float = Field(default=30.0, gt=0, description="a stream whose send blocks longer is cut")
    cors_origins: str = Field(default="", description="comma-separated origins allowed to call the API from browsers")
    event_retention_days: float = Field(default=7.0, gt=0)
    listener_linger_ms: float = Field(
        default=100.0,
        ge=0,
        le=1000,
        description="under load, the longest to wait for more changes before a batch (0.5 ms per change of the last)",
    )
    state_dir: str = Field(default=".cdc", description="where `run` keeps the embedded database and secret")
    log_level: str = "INFO"

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (for example postgresql://user@host:5432/db)")
        return value

    @field_validator("secret", "admin_secret")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 32:
            raise ValueError("must be at least 32 characters (HS256 key)")
        return value

    @field_validator("secret_previous", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        cleaned = _comma_separated(value)
        if isinstance(cleaned, list) and any(len(key) < 32 for key in cleaned):
            raise ValueError("each key must be at least 32 characters (comma-separated earlier CDC_SECRETs)")
        return cleaned

    @field_validator("admin_secret")
    @classmethod
    def _separate_admin_key(cls, value: str | None, info: ValidationInfo) -> str | None:
        # (Its length is checked by _long_enough.) The same key for both would let every business token's
        # signer mint admin tokens: the point is lost.
        if value is not None and (value == info.data.get("secret") or value in info.data.get("secret_previous", [])):
            raise ValueError("must differ from CDC_SECRET and CDC_SECRET_PREVIOUS")
        return value

    @field_validator("mpesa_allowed_ips", "trusted_proxies", mode="before")
    @classmethod
    def _address_list(cls, value: Any) -> Any:
        cleaned = _comma_separated(value)
        for entry in cleaned if isinstance(cleaned, list) else []:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR block (comma-separated list)") from None
        return cleaned

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    def require_database_url(self) -> str:
        """The database every part of the process connects to. `run` fills it in with its embedded server's URL
        before anything connects, so a process resolves it once and passes its settings, never a URL beside them."""
        if not self.database_url:
            raise ConfigError("CDC_DATABASE_URL is not set (for example postgresql://postgres@127.0.0.1:5432/postgres)")
        return self.database_url


def signing_secret(settings: Settings, *, admin: bool = False) -> str | None:
    """The key that signs tokens: for admin tokens CDC_ADMIN_SECRET when set; else CDC_SECRET, else the one
    `cdc-dashboard run` generated in the state directory (so `token` and `doctor` work against a running demo),
    else None."""
    if admin and settings.admin_secret:
        return settings.admin_secret
    if settings.secret:
        return settings.secret
    generated = Path(settings.state_dir) / "secret"
    return (generated.read_text().strip() or None) if generated.exists() else None


def load_settings() -> Settings:
    """Read the environment; raise ConfigError with one line per the first wrong variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = str(first["msg"]).removeprefix("Value error, ")
        shown = "" if field in _SENSITIVE else f" (got {first.get('input')!r})"
        raise ConfigError(f"CDC_{field.upper()}: {message}{shown}") from None
