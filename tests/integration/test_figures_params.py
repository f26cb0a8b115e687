"""The figures layer's parameter handling, without a database: cursors, bucket boundaries, repair reports, and
properties: whatever a client sends, parsing either refuses it with BadRequest or yields something a query can
bind (never an overflow, which the gateway would answer with a 500)."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdc_dashboard.figures import reads, rebuild


def test_cursor_round_trip_and_rejects() -> None:
    at = datetime(2026, 11, 26, 21, 0, 0, 123456, tzinfo=UTC)
    row = uuid.uuid4()
    assert reads.decode_cursor(reads.encode_cursor(at, row)) == (at, row)
    for bad in ["", "nope", "MjAyNi0xMS0yNg", reads.encode_cursor(at, row)[:-3]]:
        with pytest.raises(reads.BadRequest):
            reads.decode_cursor(bad)


def test_hour_buckets_follow_local_hours_in_a_half_hour_zone() -> None:
    tz = ZoneInfo("Asia/Kolkata")
    start = datetime(2026, 11, 26, 10, 45, tzinfo=tz)
    buckets = reads._buckets("hour", start, datetime(2026, 11, 26, 13, 0, tzinfo=tz), tz)
    assert [b.astimezone(tz).strftime("%H:%M") for b in buckets] == ["10:00", "11:00", "12:00"]


def test_day_buckets_across_a_dst_change_are_calendar_days() -> None:
    tz = ZoneInfo("America/New_York")  # clocks go back on 2026-11-01
    buckets = reads._buckets("day", datetime(2026, 10, 31, tzinfo=tz), datetime(2026, 11, 3, tzinfo=tz), tz)
    assert buckets == [date(2026, 10, 31), date(2026, 11, 1), date(2026, 11, 2)]
    hours = reads._buckets("hour", datetime(2026, 11, 1, tzinfo=tz), datetime(2026, 11, 2, tzinfo=tz), tz)
    assert len(hours) == 25, "the repeated 01:00 is its own bucket"


def test_month_buckets_cross_the_year() -> None:
    tz = ZoneInfo("Africa/Nairobi")
    buckets = reads._buckets("month", datetime(2026, 11, 15, tzinfo=tz), datetime(2027, 2, 1, tzinfo=tz), tz)
    assert buckets == [date(2026, 11, 1), date(2026, 12, 1), date(2027, 1, 1)]


def test_limit_parsing() -> None:
    assert reads.parse_limit(None) == reads.DEFAULT_LIMIT
    assert reads.parse_limit("200") == 200
    for bad in ["0", "201", "-1", "1.5", "x"]:
        with pytest.raises(reads.BadRequest):
            reads.parse_limit(bad)


def test_figure_differences_name_each_changed_figure() -> None:
    before = {"revenue": {"KES": {"total_minor": 5}}, "payments_count": 1, "bookings": {"by_status": {}}}
    after = {
        "revenue": {"KES": {"total_minor": 7}, "USD": {"total_minor": 1}},
        "payments_count": 1,
        "bookings": {"by_status": {}},
    }
    assert rebuild.figure_differences(before, after) == {
        "revenue.KES.total_minor": {"before": 5, "after": 7},
        "revenue.USD.total_minor": {"before": 0, "after": 1},
    }


PROPERTIES = settings(max_examples=300, deadline=None, database=None)
# The extremes of real offsets (+14, -11/-12 with DST history), a half-hour zone, and the default.
ZONES = ["Pacific/Kiritimati", "Pacific/Pago_Pago", "America/St_Johns", "Asia/Kolkata", "Africa/Nairobi", "UTC"]
# Any instant Python can write, with any offset ISO 8601 allows (the overflow hides at the ends).
instants = st.datetimes(
    timezones=st.sampled_from([None, UTC, *(timezone(timedelta(minutes=m)) for m in (-1439, -300, 840, 1439))])
)
date_texts = st.one_of(
    instants.map(lambda d: d.isoformat()),
    st.dates().map(lambda d: d.isoformat()),
    st.sampled_from(["0001-01-01", "9999-12-31", "9999-12-31T23:59:59.999999", "1969-12-31T23:59Z", "2026-W01"]),
    st.text(max_size=30),
)


@PROPERTIES
@given(
    granularity=st.sampled_from([None, "", "hour", "day", "month", "week"]),
    start=st.none() | date_texts,
    end=st.none() | date_texts,
    zone=st.sampled_from(ZONES),
)
@example(granularity="month", start="9999-01-01", end="9999-12-31", zone="Africa/Nairobi")
@example(granularity="day", start=None, end="0001-01-05", zone="UTC")
@example(granularity="hour", start=None, end="0001-01-01T05:00Z", zone="Pacific/Pago_Pago")
@example(granularity="month", start=None, end="1970-01-01T00:00Z", zone="Pacific/Pago_Pago")
@example(granularity="month", start="9998-12-01", end="9999-01-01T00:00Z", zone="Pacific/Kiritimati")
def test_any_revenue_request_is_refused_or_queryable(
    granularity: str | None, start: str | None, end: str | None, zone: str
) -> None:
    tz = ZoneInfo(zone)
    try:
        plan = reads.plan_series(granularity, start, end, tz, datetime.now(UTC))
    except reads.BadRequest as exc:
        assert str(exc)
        return
    assert reads.EARLIEST - timedelta(days=400) <= plan.start < plan.end <= reads.LATEST
    assert 1 <= len(plan.buckets) <= reads.MAX_BUCKETS
    assert plan.lower <= plan.upper
    # What the response shows must be writable too.
    shown = [plan.start.astimezone(tz).isoformat(), plan.end.astimezone(tz).isoformat()]
    shown += [reads._label(b, plan.granularity, tz) for b in plan.buckets]
    assert all(shown)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("9999-12-31", None),
        (None, "0001-01-01"),
        ("0001-01-01", "0001-01-03"),
        ("1969-12-31", "1970-01-02"),
        ("9998-12-30", "9999-01-02"),
        ("2026-01-01", "9999-12-31T23:00-05:00"),
    ],
)
def test_dates_outside_the_supported_range_are_refused_with_it(start: str | None, end: str | None) -> None:
    with pytest.raises(reads.BadRequest, match="1970-01-01 to 9999-01-01"):
        reads.plan_series("day", start, end, ZoneInfo("Africa/Nairobi"), datetime.now(UTC))


def test_the_ends_of_the_supported_range_are_served() -> None:
    tz = ZoneInfo("Pacific/Kiritimati")
    now = datetime.now(UTC)
    for gran, start, end in [
        ("hour", "1970-01-01T00:00Z", "1970-01-01T05:00Z"),
        ("month", "9990-01-01", "9999-01-01T00:00Z"),
    ]:
        plan = reads.plan_series(gran, start, end, tz, now)
        assert plan.buckets


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@PROPERTIES
@given(
    cursor=st.one_of(
        st.text(max_size=80),
        st.tuples(instants, st.uuids()).map(lambda k: _cursor(f"{k[0].isoformat()}|{k[1]}")),
        st.tuples(instants, st.uuids()).map(lambda k: _cursor(f"{k[0].isoformat()}|{k[1].hex.upper()}")),
    )
)
@example(cursor=_cursor(f"9999-12-31T23:59:59-05:00|{uuid.UUID(int=1)}"))
@example(cursor=_cursor(f"0001-01-01T00:00:00+05:00|{uuid.UUID(int=1)}"))
def test_any_cursor_is_refused_or_round_trips(cursor: str) -> None:
    try:
        at, row_id = reads.decode_cursor(cursor)
    except reads.BadRequest:
        return
    assert at.utcoffset() == timedelta(0)  # bindable: asyncpg converts to UTC
    assert reads.encode_cursor(at, row_id) == cursor


@PROPERTIES
@given(
    at=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)),
    row=st.uuids(),
)
def test_every_cursor_the_gateway_makes_is_accepted(at: datetime, row: uuid.UUID) -> None:
    assert reads.decode_cursor(reads.encode_cursor(at, row)) == (at, row)


@PROPERTIES
@given(value=st.text(max_size=8) | st.integers().map(str))
@example(value="+5")
@example(value="5_0")
@example(value="\uff11")  # a full-width 1
@example(value="9" * 5000)
def test_any_limit_is_refused_or_in_range(value: str) -> None:
    try:
        limit = reads.parse_limit(value)
    except reads.BadRequest as exc:
        assert "1 to 200" in str(exc)
        return
    assert 1 <= limit <= reads.MAX_LIMIT
    assert value == "" or (value.isascii() and value.isdigit() and int(value) == limit)
