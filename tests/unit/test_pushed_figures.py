"""How the figures are spliced into an event's payload (gateway/pushed_figures.py `with_figures`)."""

from __future__ import annotations

import json

import pytest

from cdc_dashboard.gateway.pushed_figures import with_figures

BODY = {"business_id": "b", "as_of_event_id": 7, "revenue": {"KES": {"total_minor": 1500}}, "payments_count": 1}


@pytest.mark.parametrize(
    "payload",
    [
        '{"business_id":"b","query_keys":[["dashboard-stats","b"]],"changes":[]}',
        '{"business_id": "b", "note": "a } and a {"}',  # jsonb's spacing; braces inside strings
        '  {"a":{"b":{}}}\n',
        "{}",
        "{ }",
    ],
)
def test_figures_become_the_last_member_and_the_rest_is_unchanged(payload: str) -> None:
    spliced = with_figures(payload, BODY)
    assert spliced is not None
    parsed = json.loads(spliced)
    assert list(parsed)[-1] == "figures"
    assert parsed.pop("figures") == {"dashboard-stats": BODY}
    assert parsed == json.loads(payload)
    assert "\n" not in spliced  # one SSE data line


def test_the_body_is_serialised_as_get_stats_serialises_it() -> None:
    body = {**BODY, "name": "Café"}
    spliced = with_figures('{"a":1}', body)
    assert (
        spliced
        == '{"a":1,"figures":{"dashboard-stats":' + json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "}}"
    )


@pytest.mark.parametrize("payload", ["[]", '"text"', "", "null"])
def test_a_payload_that_is_not_an_object_gets_none(payload: str) -> None:
    assert with_figures(payload, BODY) is None
