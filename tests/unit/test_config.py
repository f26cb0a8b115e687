"""Configuration: defaults, and one clear line naming the variable for every wrong value."""

from __future__ import annotations

import pytest

from cdc_dashboard.config import ConfigError, load_settings


def test_defaults_match_design(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.chdir(str(tmp_path))
    settings = load_settings()
    assert settings.database_url is None
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8000)
    assert settings.sse_ping_seconds == 15
    assert settings.secret is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CDC_HTTP_PORT", "eighty", "CDC_HTTP_PORT:"),
        ("CDC_HTTP_PORT", "70000", "CDC_HTTP_PORT:"),
        ("CDC_DATABASE_URL", "mysql://x", "CDC_DATABASE_URL: must start with postgresql://"),
        ("CDC_SSE_PING_SECONDS", "0", "CDC_SSE_PING_SECONDS:"),
        ("CDC_SECRET", "short", "CDC_SECRET: must be at least 32 characters"),
        ("CDC_LOG_LEVEL", "loud", "CDC_LOG_LEVEL: must be one of"),
    ],
)
def test_wrong_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_secrets_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_SECRET", "hunter2-short")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_dotenv_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.chdir(str(tmp_path))
    with open(".env", "w") as f:
        f.write("CDC_HTTP_PORT=9123\n")
    assert load_settings().http_port == 9123
