-- Event payloads are written as JSON text (docs/ARCHITECTURE.md, "Events: ordered, durable, one writer at a
-- time").
--
-- Until now the listener built each payload as jsonb and stored it as jsonb, and every gateway turned it back
-- into text to send it. Under load, building those payloads was the largest part of the listener's batch
-- (auto_explain on a live benchmark: 44 of 113 us per change), and it ran on the cores the writers need. Here a
-- payload is put together as text, in DESIGN's key order, and stored as `json`: PostgreSQL only checks that it
-- parses (about a microsecond for a payload), and gateways send it as stored. Measured: docs/BENCHMARKS.md,
-- "2026-11-27, third session".
--
-- The column's type changes in place, which rewrites dashboard.events once, under a lock that holds gateways'
-- reads until it is done (events are retained for days, not kept for ever: seconds on a typical database).
-- Readers that need jsonb operators cast: `payload::jsonb -> 'changes' @> ...` (doctor's probe does).

alter table dashboard.events alter column payload type json using payload::json;

-- The batch as in 0007, with payloads built as text. Strings (business ids, table names, row ids, currencies,
-- methods, client names) go through to_json, which escapes them; numbers and the fixed operation names go in
-- as they are.
create or replace function dashboard.consume_changes_body_v1(batch_size integer, new_state text, from_id bigint,
                                                check_row_ids boolean)
returns table (consumed integer, last_change_id bigint, events_appended integer, last_event_id bigint,
               dead_letters jsonb)
language plpgsql as $$
#variable_conflict use_column
declare
    c_id        bigint[];
    c_table     text[];
    c_op        text[];
    c_business  text[];
    c_row       text[];
    c_old       jsonb[];
    c_new       jsonb[];
    c_at        timestamptz[];
    c_problem   text[];
    c_toast     boolean[];
    any_problem boolean;
    truncated   text[];
    pay_ids     uuid[];
    booking_ids uuid[];
    rejected    jsonb := '[]';
    e_business  text[];
    e_kind      text[];
    e_payload   text[];
    new_last_id bigint;
begin
    -- The change log is a queue: taking a change deletes it, in this transaction. A writer that commits late
    -- still has its rows here; nothing can be skipped by a cursor moving past it. from_id only saves the scan
    -- the index entries of changes consumed long ago (dead until vacuum reaches them): the listener passes a
    -- recent id while busy and 0 before it sleeps and every second, so a change below it is only delayed.
    -- No FOR UPDATE: one listener consumes at a time (the leader lock), and were a second one to race it, its
    -- DELETE would wait for the first and then find the rows gone (READ COMMITTED rechecks), never take them
    -- twice. Locking each row first cost a tuple lock and a WAL record per change.
    with taken as (
        delete from cdc.change_log c
         where c.id = any(array(select id from cdc.change_log where id >= from_id
                                 order by id limit batch_size))
        returning c.*
    ), checked as (
        -- uuid_row: the row id can be cast to uuid (payments and bookings have uuid keys, so the capture
        -- trigger only ever writes UUIDs for them; see consume_changes_v1 for a hand-written change)
        select t.*, dashboard.change_problem_v1(t.op, t.table_name, t.business_id) as problem,
               (not check_row_ids
                or t.row_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$') as uuid_row
          from taken t
    ), ordered as (
        -- toast: a payment that is completed now and was not before (the owner gets a toast)
        select c.*, coalesce(c.uuid_row and c.problem is null
                             and dashboard.short_table_name_v1(c.table_name) = 'payments'
                             and c.new_values ->> 'status' = 'completed'
                             and (c.op = 'INSERT' or (c.old_values ->> 'status') is distinct from 'completed'),
                             false) as toast
          from checked c order by c.id
    )
    select array_agg(id), array_agg(table_name), array_agg(op), array_agg(business_id), array_agg(row_id),
           array_agg(old_values), array_agg(new_values), array_agg(captured_at), array_agg(problem), array_agg(toast),
           bool_or(problem is not null),
           array_agg(distinct table_name order by table_name) filter (where op = 'TRUNCATE' and problem is null),
           array_agg(distinct case when uuid_row then row_id::uuid end)
               filter (where uuid_row and problem is null and op <> 'TRUNCATE'
                         and dashboard.short_table_name_v1(table_name) = 'payments'),
           array_agg(distinct case when uuid_row then row_id::uuid end)
               filter (where uuid_row and problem is null and op <> 'TRUNCATE'
                         and dashboard.short_table_name_v1(table_name) = 'bookings')
      into c_id, c_table, c_op, c_business, c_row, c_old, c_new, c_at, c_problem, c_toast, any_problem, truncated,
           pay_ids, booking_ids
      from ordered;
    if c_id is null then
        return query select 0, null::bigint, 0, null::bigint, '[]'::jsonb;
        return;
    end if;

    if any_problem then
        with kept as (
            insert into dashboard.dead_letters (change, reason)
            select jsonb_build_object('id', id, 'table', table_name, 'op', op, 'business_id', business_id,
                                      'row_id', row_id, 'old', old_values, 'new', new_values,
                                      'captured_at', captured_at),
                   problem
              from unnest(c_id, c_table, c_op, c_business, c_row, c_old, c_new, c_at, c_problem)
                   as u(id, table_name, op, business_id, row_id, old_values, new_values, captured_at, problem)
             where problem is not null
             order by id
            returning change, reason
        )
        select jsonb_agg(jsonb_build_object('change_id', (change ->> 'id')::bigint, 'reason', reason))
          into rejected
          from kept;
    end if;

    -- Figures first (lock 4242000005), events after (lock 4242000002): the order every caller keeps.
    if truncated is not null then
        perform count(*) from dashboard.rebuild_aggregates_v2(array(select id from businesses));
    else
        if pay_ids is not null then
            perform dashboard.sync_payments_v2(pay_ids);
        end if;
        if booking_ids is not null then
            perform dashboard.sync_bookings_v2(booking_ids);
        end if;
    end if;

    -- One pass over the batch, grouped by business. (Plans here are generic and estimate a batch at a few rows,
    -- so the statement joins batch-sized sets only to indexes, never to each other: such a join would become
    -- a nested loop, quadratic in the batch.)
    with usable as (
        select u.*, dashboard.short_table_name_v1(u.table_name) as tbl,
               row_number() over (partition by u.business_id order by u.id) as nth,
               u.toast and row_number() over (partition by u.business_id, u.row_id, u.toast order by u.id) = 1
                   as first_toast
          from unnest(c_id, c_table, c_op, c_business, c_row, c_at, c_toast, c_problem)
               as u(id, table_name, op, business_id, row_id, captured_at, toast, problem)
         where u.problem is null and u.op <> 'TRUNCATE'
    ), per_business as (
        select u.business_id, min(u.id) as first_id, count(*) as change_count, max(u.captured_at) as committed_at,
               array_agg(distinct u.tbl) as tables,
               -- (op is one of INSERT, UPDATE, DELETE here: change_problem_v1 let nothing else through)
               string_agg('{"table":' || to_json(u.tbl)::text || ',"op":"' || u.op || '","id":'
                          || coalesce(to_json(u.row_id)::text, 'null') || '}', ',' order by u.id)
                   filter (where u.nth <= 100) as changes,
               array_agg('{"id":"' || p.id::text || '","amount_minor":' || p.amount_minor::text
                         || ',"currency":' || to_json(p.currency)::text || ',"method":' || to_json(p.method)::text
                         || ',"client_name":' || coalesce(to_json(c.name)::text, 'null')
                         || ',"status":' || to_json(p.status)::text || '}' order by u.id)
                   filter (where p.id is not null) as toasts
          from usable u
          -- the toast's payment as it is now (still completed); the case keeps other rows' ids from the cast
          left join payments p on p.id = case when u.first_toast then u.row_id::uuid end and p.status = 'completed'
          left join clients c on c.id = p.client_id
         group by u.business_id
    ), key_templates as materialized (  -- materialized: one template per set, not one per event
        select tables, dashboard.query_keys_template_v1(tables) as template
          from (select distinct tables from per_business) as sets
    ), planned as (
        select null::text as business_id, 0::bigint as first_id, 'resync' as kind,
               json_build_object('reason', 'truncate', 'tables', truncated)::text as payload
         where truncated is not null
        union all
        select pb.business_id, pb.first_id, 'invalidate',
               '{"business_id":' || to_json(pb.business_id)::text
               || ',"query_keys":' || replace(k.template, chr(1), to_json(pb.business_id)::text)
               || ',"changes":[' || pb.changes || '],"change_count":' || pb.change_count::text
               || ',"payments":[' || coalesce(array_to_string(pb.toasts[1:50], ','), '')
               || '],"committed_at":"' || to_char(pb.committed_at at time zone 'UTC',
                                                 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') || '"}'
          from per_business pb
          join key_templates k on k.tables = pb.tables
    )
    select array_agg(business_id order by first_id), array_agg(kind order by first_id),
           array_agg(payload order by first_id)
      into e_business, e_kind, e_payload
      from planned;

    if e_kind is not null then
        -- Ids are handed out under the events lock and committed before it is released: in commit order.
        perform pg_advisory_xact_lock(4242000002);
        insert into dashboard.events (id, business_id, kind, payload)
        select nextval('dashboard.event_id_seq'), b, k, p::json
          from (select * from unnest(e_business, e_kind, e_payload) with ordinality as u(b, k, p, ord)
                 order by ord) as ordered;
        new_last_id := currval('dashboard.event_id_seq');
    end if;

    update dashboard.listener_state as s
       set last_change_id = greatest(s.last_change_id, c_id[cardinality(c_id)]),
           last_change_at = (select max(a) from unnest(c_at) as a),
           last_event_id = coalesce(new_last_id, s.last_event_id),
           heartbeat_at = now(),
           state = new_state;
    if new_last_id is not null then
        perform pg_notify('dashboard_events_v1', new_last_id::text);  -- one wake-up for the gateways
    end if;

    return query select cardinality(c_id), c_id[cardinality(c_id)], coalesce(cardinality(e_kind), 0), new_last_id,
                        coalesce(rejected, '[]');
end $$;
