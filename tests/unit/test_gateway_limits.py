"""The limits' bookkeeping on a fake clock: token buckets, their bounded table, the refresh cooldown, the
per-token stream count; and how the client address is read from X-Forwarded-For."""

from __future__ import annotations

import ipaddress

import pytest

from cdc_dashboard.config import ConfigError, load_settings
from cdc_dashboard.gateway.addresses import rate_limit_key
from cdc_dashboard.gateway.limits import RateLimiter, RefreshCooldown, StreamsPerToken, retry_after
from cdc_dashboard.ingest.sources import caller_ip, networks


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_minute_in_a_burst_then_the_average() -> None:
    clock = Clock()
    limiter = RateLimiter(60, clock=clock)  # one a second
    assert all(limiter.take("a") is None for _ in range(60))
    wait = limiter.take("a")
    assert wait is not None and 0.99 <= wait <= 1.0
    assert limiter.take("b") is None  # another address has its own bucket
    clock.now += 1.0
    assert limiter.take("a") is None
    assert limiter.take("a") is not None


def test_bucket_off_at_zero() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.take("a") is None for _ in range(10_000))
    assert len(limiter) == 0


def test_idle_buckets_are_forgotten_and_the_table_has_a_ceiling() -> None:
    clock = Clock()
    limiter = RateLimiter(60, max_keys=1000, clock=clock)
    for n in range(5000):
        limiter.take(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 1000  # the ceiling: the least recently seen went first
    clock.now += 61  # every bucket has refilled: remembering them changes nothing
    limiter.take("192.0.2.1")
    assert len(limiter) == 1


def test_refresh_cooldown_per_business_and_given_back_on_failure() -> None:
    clock = Clock()
    cooldown = RefreshCooldown(10, clock=clock)
    assert cooldown.claim("b1") is None
    clock.now += 3
    assert cooldown.claim("b1") == pytest.approx(7)
    assert cooldown.claim("b2") is None
    clock.now += 7
    assert cooldown.claim("b1") is None
    cooldown.forget("b1")
    assert cooldown.claim("b1") is None
    assert RefreshCooldown(0).claim("b1") is None and RefreshCooldown(0).claim("b1") is None


def test_streams_per_token_count_drops_to_nothing() -> None:
    streams = StreamsPerToken(2)
    assert streams.acquire("t") and streams.acquire("t")
    assert not streams.acquire("t")
    assert streams.acquire("u")
    streams.release("t")
    assert streams.acquire("t")
    for _ in range(2):
        streams.release("t")
    assert streams.held("t") == 0
    assert "t" not in streams._open  # no entry left behind by a token whose streams all ended


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after(s) for s in (0.0, 0.2, 1.0, 1.01, 9.5)] == ["1", "1", "1", "2", "10"]


def test_forwarded_for_lines_are_one_list() -> None:
    proxies = networks(["127.0.0.1"])
    # The caller wrote the first line; the proxy appended the second: the second is the caller.
    assert str(caller_ip("127.0.0.1", ["196.201.214.200", "203.0.113.9"], proxies)) == "203.0.113.9"
    assert str(caller_ip("127.0.0.1", ["203.0.113.9", "196.201.214.200"], proxies)) == "196.201.214.200"
    assert str(caller_ip("127.0.0.1", ["1.1.1.1, 203.0.113.9", "127.0.0.1"], proxies)) == "203.0.113.9"
    assert str(caller_ip("127.0.0.1", ["", "  "], proxies)) == "127.0.0.1"
    assert str(caller_ip("203.0.113.5", ["196.201.214.200", "196.201.214.201"], proxies)) == "203.0.113.5"


def test_rate_limit_key_groups_an_ipv6_host_by_its_64() -> None:
    a = ipaddress.ip_address("2001:db8:1:2::1")
    b = ipaddress.ip_address("2001:db8:1:2:ffff::9")
    assert rate_limit_key(a) == rate_limit_key(b) == "2001:db8:1:2::/64"
    assert rate_limit_key(ipaddress.ip_address("192.0.2.7")) == "192.0.2.7"
    assert rate_limit_key(None) == "unknown"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CDC_MAX_STREAMS_PER_TOKEN", "0"),
        ("CDC_REFRESH_COOLDOWN_SECONDS", "-1"),
        ("CDC_RATE_LIMIT_WEBHOOKS_PER_MINUTE", "-5"),
        ("CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE", "many"),
    ],
)
def test_limit_settings_are_validated(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_limit_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("MAX_STREAMS_PER_TOKEN", "REFRESH_COOLDOWN_SECONDS", "RATE_LIMIT_WEBHOOKS_PER_MINUTE"):
        monkeypatch.delenv(f"CDC_{variable}", raising=False)
    monkeypatch.delenv("CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE", raising=False)
    monkeypatch.chdir("/")  # no .env
    settings = load_settings()
    assert (settings.max_streams_per_token, settings.refresh_cooldown_seconds) == (10, 10.0)
    assert (settings.rate_limit_webhooks_per_minute, settings.rate_limit_stream_opens_per_minute) == (6000, 1200)
