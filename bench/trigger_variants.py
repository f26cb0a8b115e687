"""What the capture trigger's parts cost: backend CPU per single-row insert, with variants of the trigger.

    .venv/bin/python bench/trigger_variants.py [--inserts 3000] [--rounds 10]

Like bench/write_path_cpu.py (one connection, one insert per transaction, `synchronous_commit = off`, the
backend's CPU from /proc), but over several copies of `payments`, each tracked with a variant of its generated
capture function (tables `capture_*`): as generated (`full`), doing nothing (`empty`: PL/pgSQL's trigger call
alone), without the sleep check (`no_sleep_check`), without the jsonb of watched values (`no_watched_values`),
and fired BEFORE instead of AFTER the row is written (`before`); plus the untracked copy of
bench/capture_overhead.py. Rounds alternate the order; prints the median per table. Scratch database, dropped at
the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import psycopg

from capture_overhead import BUSINESSES, SETUP
from scratch import scratch_database
from write_path_cpu import microseconds_per_insert

# (table, how its generated capture function is rewritten, fired before the row is written)
VARIANTS: list[tuple[str, str, bool]] = [
    ("capture_full", "src", False),
    ("capture_empty", "regexp_replace(src, 'begin.*end', E'begin\\n    return null;\\nend')", False),
    ("capture_no_sleep_check", "regexp_replace(src, 'if to_timestamp.*?end if;', '')", False),
    ("capture_no_watched_values", "replace(src, 'jsonb_build_object(''status'', new.status)', 'null')", False),
    ("capture_before", "replace(src, 'return null;', 'return coalesce(new, old);')", True),
]

COPY = """
create table {t} (like payments including all);
alter table {t} add foreign key (business_id) references businesses (id) on delete cascade,
                add foreign key (client_id) references clients (id) on delete set null,
                add foreign key (booking_id) references bookings (id) on delete set null;
create trigger touch_updated_at_v1 before update on {t} for each row execute function touch_updated_at_v1();
select cdc.track('public.{t}', watch_columns => array['status']);
do $$
declare
    fn      text := cdc.capture_function_name_v1('public.{t}');
    src     text := pg_get_functiondef(('cdc.' || cdc.capture_function_name_v1('public.{t}'))::regproc);
    variant text;
begin
    variant := {rewrite};
    if variant = src and '{t}' <> 'capture_full' then
        raise exception 'the variant {t} changed nothing: the generated capture function no longer matches';
    end if;
    execute variant;
    if {before} then
        execute 'drop trigger cdc_capture_v1 on {t}';
        execute format('create trigger cdc_capture_v1 before insert or update or delete on {t} '
                       'for each row execute function cdc.%I()', fn);
    end if;
end $$;
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--inserts", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    tables = [name for name, _, _ in VARIANTS] + ["bench_untracked_payments"]
    results: dict[str, list[float]] = {t: [] for t in tables}
    with scratch_database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.format(n=BUSINESSES))
            for name, rewrite, before in VARIANTS:
                conn.execute(COPY.format(t=name, rewrite=rewrite, before="true" if before else "false"))
        for i in range(args.rounds):
            for table in tables if i % 2 == 0 else reversed(tables):
                results[table].append(microseconds_per_insert(url, table, args.inserts))
    for table in tables:
        print(
            f"{table:26s} {statistics.median(results[table]):6.1f} us per insert"
            f"  (rounds: {[round(x) for x in results[table]]})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
