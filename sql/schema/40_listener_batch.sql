-- The listener's batch: one statement per batch, `dashboard.consume_changes_v2`, which in autocommit is the
-- batch's transaction: consume changes from cdc.change_log, set aside what cannot be processed, bring the
-- aggregates up to date and append the events (docs/ARCHITECTURE.md, "Events" and "Dead letters").
--
-- Functions called per batch run generic plans (planning them anew would cost more than running them), with
-- sequential scans off (a plan made while the tables were small must stay right while they grow: every
-- statement probes by key) and JIT off (a disabled scan is costed high enough to trigger it, and no statement
-- of a batch gains from it).

-- Changes the listener could not turn into an event, with the reason (and the SQL error's state, null when set
-- aside by rule): never retried silently; `cdc-dashboard dead-letters retry` puts them back.
create table dashboard.dead_letters (
    id          bigint generated always as identity primary key,
    change      jsonb not null,
    reason      text not null,
    created_at  timestamptz not null default now(),
    sqlstate    text
);

-- `public.payments` -> `payments`; other schemas keep their prefix (as events name tables).
create function dashboard.short_table_name_v1(table_name text) returns text
language sql immutable parallel safe as $$
    select case when table_name like 'public._%' then substr(table_name, 8) else table_name end
$$;

-- The query keys a change to a table invalidates, in DESIGN's order ("The event stream"): every figure and
-- list for the payment tables, the stats, business data and bookings for bookings; a table an application
-- tracks itself invalidates the stats and a key named after it.
create function dashboard.query_keys_v1(table_name text) returns text[]
language sql immutable parallel safe as $$
    select case
        when dashboard.short_table_name_v1(table_name) in ('payments', 'payment_transactions',
                                                           'client_business_transactions')
            then '{dashboard-stats,business-revenue,business-data,transactions,client-business-transactions,'
                 'payment-transactions,payments}'::text[]
        when dashboard.short_table_name_v1(table_name) = 'bookings'
            then '{dashboard-stats,business-data,bookings}'::text[]
        else array['dashboard-stats', dashboard.short_table_name_v1(table_name)]
    end
$$;

-- The query keys a set of tables invalidates, each once, in DESIGN's order (the keys of payments, then
-- bookings, then an application's own keys by name).
--
-- The JSON of those keys as [[key, B], ...], with B standing for the business: a batch builds it once per set
-- of tables, and each event puts its business in. B is the byte 0x01, which JSON text never contains raw
-- (to_json escapes it), so replacing it cannot touch a key. (plpgsql, not SQL: a SQL function with a FROM
-- clause is parsed and planned again in every batch; plpgsql keeps its plan for the session.)
create function dashboard.query_keys_template_v1(tables text[]) returns text
language plpgsql immutable parallel safe as $$
begin
    return (
        select '[' || string_agg('[' || to_json(key)::text || ',' || chr(1) || ']', ',' order by
                   array_position('{dashboard-stats,business-revenue,business-data,transactions,'
                                  'client-business-transactions,payment-transactions,payments,bookings}'::text[],
                                  key), key) || ']'
          from (select distinct unnest(dashboard.query_keys_v1(t)) as key from unnest(tables) as t) as keys
    );
end $$;

-- Why a captured change cannot become an event (it goes to dashboard.dead_letters), or null. (No format():
-- it is only stable, and an immutable SQL function that calls it is not inlined but called per change.)
create function dashboard.change_problem_v1(op text, table_name text, business_id text) returns text
language sql immutable parallel safe as $$
    select case
        when op is null or op not in ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
            then 'unknown operation ' || quote_nullable(op)
        when coalesce(table_name, '') = '' then 'change names no table'
        when op = 'TRUNCATE' then null
        when coalesce(business_id, '') = '' then op || ' on ' || table_name || ' carries no business key'
        when length(business_id) > 200 or business_id ~ '[[:cntrl:]]'
            then 'business key is not a printable key of at most 200 characters'
    end
$$;

-- Consume up to batch_size changes and turn them into events, recording new_state as the listener's state, in
-- the caller's transaction; only changes with id >= from_id are looked at. Returns how many changes were
-- consumed and the highest id among them, how many events were appended and the last event id, and the changes
-- set aside as dead letters ([{change_id, reason}]).
--
-- Event payloads (DESIGN, "The event stream"), built as JSON text in DESIGN's key order: one `invalidate` per
-- business, in the order of its first change; its query keys once each in DESIGN's order; at most 100 changes
-- listed (change_count counts all); the payments that became completed, for toasts (at most 50); committed_at
-- is the capture time of its newest change. Strings go through to_json, which escapes them. A TRUNCATE
-- becomes one `resync` for every dashboard, first, and rebuilds every business's figures.
--
-- check_row_ids: check each row id before casting it to uuid. The capture trigger writes the ids of payments
-- and bookings from their uuid keys, so the fast path does not (a regular expression per change is a large
-- part of the batch's cost); a hand-written change with another id fails the cast, and consume_changes_v2 then
-- takes the batch again, checked.
create function dashboard.consume_changes_body_v2(batch_size integer, new_state text, from_id bigint,
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
        perform count(*) from dashboard.rebuild_aggregates_v3(array(select id from businesses));
    else
        if pay_ids is not null then
            perform dashboard.sync_payments_v3(pay_ids);
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

-- Errors that say nothing about the change being processed: the batch is retried whole, later, by the
-- listener (connection, transaction rollback, resources, lock timeouts, shutdown, system errors; schema and
-- privilege errors, which every change would hit alike). Everything else is a data error or a bug that
-- concerns the change at hand.
create function dashboard.is_transient_error_v1(state text) returns boolean
language sql immutable parallel safe as $$
    select left(state, 2) in ('08', '40', '42', '53', '55', '57', '58', '3D', '3F', '28')
$$;

-- Consume up to batch_size changes as consume_changes_body_v2 does, isolating what fails: pieces of the batch
-- are retried smaller and smaller (each in a subtransaction) until a single change still fails; that change goes
-- to dashboard.dead_letters with its error and the rest carry on. Same results as consume_changes_body_v2.
create function dashboard.consume_changes_isolated_v1(batch_size integer, new_state text, from_id bigint)
returns table (consumed integer, last_change_id bigint, events_appended integer, last_event_id bigint,
               dead_letters jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set jit = off
as $$
#variable_conflict use_column
declare
    piece      integer := greatest(batch_size / 2, 1);
    remaining  integer := batch_size;
    r          record;
    bad        record;
    err_state  text;
    err_text   text;
    err_detail text;
    total      integer := 0;
    last_id    bigint;
    appended   integer := 0;
    event_id   bigint;
    rejected   jsonb := '[]';
begin
    while remaining > 0 loop
        begin
            select * into r from dashboard.consume_changes_body_v2(least(piece, remaining), new_state, from_id, true);
            total := total + r.consumed;
            remaining := remaining - r.consumed;
            last_id := greatest(last_id, r.last_change_id);
            appended := appended + r.events_appended;
            event_id := coalesce(r.last_event_id, event_id);
            rejected := rejected || r.dead_letters;
            exit when r.consumed < least(piece, remaining + r.consumed);  -- the log is empty
            piece := least(piece * 2, batch_size);
            continue;
        exception when others then
            get stacked diagnostics err_state = returned_sqlstate, err_text = message_text,
                                    err_detail = pg_exception_detail;
            if dashboard.is_transient_error_v1(err_state) then
                raise;
            end if;
        end;
        if piece > 1 then
            piece := piece / 2;
            continue;
        end if;
        -- One change, and it fails on its own: set it aside.
        delete from cdc.change_log c
         where c.id = (select id from cdc.change_log where id >= from_id order by id limit 1)
        returning c.* into bad;
        exit when bad.id is null;  -- (cannot happen: the piece that failed held a change)
        insert into dashboard.dead_letters (change, reason, sqlstate)
        values (jsonb_build_object('id', bad.id, 'table', bad.table_name, 'op', bad.op,
                                   'business_id', bad.business_id, 'row_id', bad.row_id, 'old', bad.old_values,
                                   'new', bad.new_values, 'captured_at', bad.captured_at),
                err_text || coalesce(' (' || nullif(err_detail, '') || ')', ''), err_state);
        update dashboard.listener_state as s
           set last_change_id = greatest(s.last_change_id, bad.id), heartbeat_at = now(), state = new_state;
        rejected := rejected || jsonb_build_array(jsonb_build_object(
            'change_id', bad.id, 'reason', err_text, 'sqlstate', err_state));
        total := total + 1;
        remaining := remaining - 1;
        last_id := greatest(last_id, bad.id);
        piece := 1;
    end loop;
    return query select total, last_id, appended, event_id, rejected;
end $$;

-- The listener's batch: consume_changes_body_v2 whole, which is the common case and costs one
-- subtransaction; on a data error, the same changes again, isolated (above).
create function dashboard.consume_changes_v2(batch_size integer, new_state text, from_id bigint)
returns table (consumed integer, last_change_id bigint, events_appended integer, last_event_id bigint,
               dead_letters jsonb)
language plpgsql
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
set jit = off
as $$
declare
    err_state text;
begin
    begin
        return query select * from dashboard.consume_changes_body_v2(batch_size, new_state, from_id, false);
        return;
    exception when others then
        get stacked diagnostics err_state = returned_sqlstate;
        if dashboard.is_transient_error_v1(err_state) then
            raise;
        end if;
    end;
    -- A row id that is not a UUID on a table the figures read (a hand-written change) fails the fast path's
    -- cast; the checked path ignores such ids. Either way, what still fails is isolated.
    return query select * from dashboard.consume_changes_isolated_v1(batch_size, new_state, from_id);
end $$;
