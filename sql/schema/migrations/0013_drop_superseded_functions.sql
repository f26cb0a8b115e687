-- Dead code out, and the manual refresh's events built as the listener builds its own (issue 15).
--
-- 1. Function versions nothing calls any more. The listener calls consume_changes_v2 (0010), which calls
--    consume_changes_body_v2, sync_payments_v3, sync_bookings_v2 and, for a TRUNCATE, rebuild_aggregates_v3;
--    refresh and `aggregates rebuild` call rebuild_aggregates_v4 (0012). What the listener of before 0010 called
--    goes: consume_changes_v1 and its body, the v2 facts view and the functions over it, apply_changes_v2 (a
--    per-batch entry point only benchmarks and tests still called) and the rebuild_aggregates_v1 wrapper.
-- 2. dashboard.append_refresh_events_v1: a manual refresh's payload was built in Python and stored through
--    jsonb, so its keys came in jsonb's order, not in the listener's; now it is built in SQL, as the listener's.
--
-- sql/schema/20_events.sql holds the same function: a new database gets it from there.

drop function dashboard.apply_changes_v2(text[], text[]);
drop function dashboard.rebuild_aggregates_v1(uuid[]);
drop function dashboard.consume_changes_v1(integer, text, bigint);
drop function dashboard.consume_changes_body_v1(integer, text, bigint, boolean);
drop function dashboard.rebuild_aggregates_v2(uuid[]);
drop function dashboard.sync_payments_v2(uuid[]);
drop view dashboard.completed_payment_facts_v2;

-- A manual refresh's events: one `invalidate` per business, naming every query key, with no changes listed. The
-- payload is put together as the listener's batch puts its own (consume_changes_body_v2): the listener's
-- query-key template for the payment tables and bookings, the same keys in the same order, the same formats;
-- `reason` last. Appended under the events lock, in the caller's transaction (which rebuilt the figures).
create function dashboard.append_refresh_events_v1(business_ids text[]) returns bigint[]
language plpgsql as $$
declare
    template text := dashboard.query_keys_template_v1('{public.payments,public.bookings}');
    ids      bigint[];
begin
    perform pg_advisory_xact_lock(4242000002);
    with inserted as (
        insert into dashboard.events (id, business_id, kind, payload)
        select nextval('dashboard.event_id_seq'), b, 'invalidate',
               ('{"business_id":' || to_json(b)::text
                || ',"query_keys":' || replace(template, chr(1), to_json(b)::text)
                || ',"changes":[],"change_count":0,"payments":[],"committed_at":"'
                || to_char(now() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
                || '","reason":"manual_refresh"}')::json
          from (select b from unnest(business_ids) with ordinality as u(b, ord) order by ord) as ordered
        returning id
    )
    select coalesce(array_agg(id order by id), '{}') into ids from inserted;
    if cardinality(ids) > 0 then
        update dashboard.listener_state set last_event_id = ids[cardinality(ids)];
        perform pg_notify('dashboard_events_v1', ids[cardinality(ids)]::text);
    end if;
    return ids;
end $$;
