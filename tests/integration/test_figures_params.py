"""The figures layer's parameter handling, without a database: cursors, bucket boundaries, repair reports."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

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
