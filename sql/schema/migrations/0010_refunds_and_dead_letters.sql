-- Refunds net out of revenue, sums that cannot overflow, and a listener batch that one bad change cannot stop
-- (docs/ARCHITECTURE.md, "Aggregates" and "Dead letters"; DESIGN.md, guarantee 6 and "Figure definitions").
--
-- 1. Partial refunds. `payments.refunded_minor` is what has been refunded of a payment so far; revenue counts
--    amount_minor - refunded_minor of every completed payment, so a 100.00 charge refunded 1.00 still counts
--    99.00 (until now any refund made the payment `refunded`, and it dropped out whole). A payment's fact now
--    holds that net amount: the facts view gets a new version, and so do the functions that read it.
-- 2. Amounts are bounded (0..10^12 minor units, ten billion in a two-decimal currency: far above any real
--    payment, far below what can overflow), and the daily revenue rollup is `numeric`: a day of a business
--    sums exactly whatever the tables hold. The bound is NOT VALID: a database in the field may hold a larger
--    amount already, and `db apply` must not fail on it; every new or updated row is checked, and the sums are
--    exact either way.
-- 3. Refunds are idempotent on the provider's own refund reference: `payment_transactions.provider_reference`,
--    unique per provider where present.
-- 4. The batch isolates what it cannot process. `consume_changes_v2` runs the batch as before; when it fails
--    with an error that is not transient, it runs the same changes again in smaller and smaller pieces (halving
--    on failure, doubling again on success), so the good changes commit and go out in large pieces and each
--    failing change is found in a logarithmic number of attempts. A single change that still fails is moved,
--    with its SQL error, to `dashboard.dead_letters`: `cdc-dashboard dead-letters retry` puts it back after the
--    cause is fixed. Transient errors (serialization, deadlock, lock timeouts, resources, shutdown, and schema
--    or privilege errors, which hit every change alike and go away with a deploy) are raised: the listener
--    retries the batch after a backoff, and nothing is set aside.
--
-- A listener of an older version (calling consume_changes_v1) keeps working on this schema during a rolling
-- deploy, but counts refunded payments gross; `cdc-dashboard aggregates rebuild` after the deploy repairs that.

alter table payments add column refunded_minor bigint not null default 0;
alter table payments add constraint payments_refunded_minor_check
    check (refunded_minor >= 0 and refunded_minor <= amount_minor);
alter table payments add constraint payments_amount_minor_bound check (amount_minor <= 1000000000000) not valid;

alter table payment_transactions add column provider_reference text;
create unique index payment_transactions_provider_reference_key
    on payment_transactions (provider, provider_reference) where provider_reference is not null;

alter table dashboard.dead_letters add column sqlstate text;  -- null: set aside by rule (change_problem_v1)

alter table dashboard.revenue_daily alter column revenue_minor type numeric;

drop view dashboard.revenue_hourly;
create view dashboard.revenue_hourly as
select business_id, local_hour as hour_start, currency, sum(amount_minor) as revenue_minor,
       count(*)::bigint as payments_count
  from dashboard.payment_facts
 group by business_id, local_hour, currency;

-- The facts the base tables call for now (as v2, counting what is left after refunds).
create view dashboard.completed_payment_facts_v3 as
select p.id as payment_id, p.business_id, p.currency, p.amount_minor - p.refunded_minor as amount_minor,
       p.client_id,
       (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date as local_day,
       date_trunc('hour', coalesce(p.paid_at, p.created_at), b.timezone) as local_hour
  from payments p join businesses b on b.id = p.business_id
 where p.status = 'completed';

-- As sync_payments_v2 (0009), over the v3 facts and the numeric daily rollup.
create function dashboard.sync_payments_v3(ids uuid[]) returns void
language plpgsql as $$
declare
    pair_b uuid[];
    pair_c uuid[];
    zd_b   uuid[];
    zd_d   date[];
    zd_c   text[];
begin
    if coalesce(cardinality(ids), 0) = 0 then
        return;
    end if;
    perform pg_advisory_xact_lock(4242000005);

    -- One statement, one snapshot: the old facts, the current rows and the deltas agree.
    with old as (
        select * from dashboard.payment_facts where payment_id = any(ids)
    ), cur as (
        select * from dashboard.completed_payment_facts_v3 where payment_id = any(ids)
    ), moved as (
        select business_id, local_day, currency, -amount_minor as amount, -1 as n from old
        union all
        select business_id, local_day, currency, amount_minor, 1 from cur
    ), daily as (
        insert into dashboard.revenue_daily as r (business_id, day, currency, revenue_minor, payments_count)
        select business_id, local_day, currency, sum(amount), sum(n)::bigint from moved group by 1, 2, 3
        on conflict (business_id, day, currency) do update
           set revenue_minor = r.revenue_minor + excluded.revenue_minor,
               payments_count = r.payments_count + excluded.payments_count
        returning r.business_id, r.day, r.currency, r.payments_count
    ), upserted as (
        insert into dashboard.payment_facts as f select * from cur
        on conflict (payment_id) do update
           set business_id = excluded.business_id, currency = excluded.currency,
               amount_minor = excluded.amount_minor, client_id = excluded.client_id,
               local_day = excluded.local_day, local_hour = excluded.local_hour
        returning 1
    ), removed as (
        -- (a set difference, never a join of two batch-sized sets: see the header)
        delete from dashboard.payment_facts f
         where f.payment_id = any(array(select payment_id from old except select payment_id from cur))
        returning 1
    ), pairs as (
        select business_id, client_id from old where client_id is not null
        union
        select business_id, client_id from cur where client_id is not null
    ), zd as (
        select * from daily where payments_count = 0
    )
    select (select coalesce(array_agg(business_id order by business_id, client_id), '{}') from pairs),
           (select coalesce(array_agg(client_id order by business_id, client_id), '{}') from pairs),
           (select coalesce(array_agg(business_id order by business_id, day, currency), '{}') from zd),
           (select coalesce(array_agg(day order by business_id, day, currency), '{}') from zd),
           (select coalesce(array_agg(currency order by business_id, day, currency), '{}') from zd)
      into pair_b, pair_c, zd_b, zd_d, zd_c;

    -- A bucket whose last payment left holds nothing: drop it rather than keep a zero row.
    delete from dashboard.revenue_daily r using unnest(zd_b, zd_d, zd_c) as z(b, d, c)
     where r.business_id = z.b and r.day = z.d and r.currency = z.c and r.payments_count = 0;

    -- The clients these payments involve (before or after): their first completed day, from the facts (which
    -- this transaction just updated), and the business's client count by the same difference.
    with fresh as (
        select p.b as business_id, p.c as client_id,
               (select min(f.local_day) from dashboard.payment_facts f
                 where f.business_id = p.b and f.client_id = p.c) as first_paid_day
          from unnest(pair_b, pair_c) as p(b, c)
    ), gone as (
        delete from dashboard.business_clients bc using fresh
         where fresh.first_paid_day is null and bc.business_id = fresh.business_id and bc.client_id = fresh.client_id
        returning bc.business_id, -1 as delta
    ), kept as (
        insert into dashboard.business_clients as bc (business_id, client_id, first_paid_day)
        select business_id, client_id, first_paid_day from fresh where first_paid_day is not null
        on conflict (business_id, client_id) do update set first_paid_day = excluded.first_paid_day
         where bc.first_paid_day is distinct from excluded.first_paid_day
        returning bc.business_id, case when bc.xmax = 0 then 1 else 0 end as delta
    )
    insert into dashboard.business_client_totals as t (business_id, clients_total)
    select business_id, sum(delta)::bigint from (select * from gone union all select * from kept) as d group by 1
    on conflict (business_id) do update set clients_total = t.clients_total + excluded.clients_total;
end $$;

alter function dashboard.sync_payments_v3(uuid[]) set plan_cache_mode = force_generic_plan;  -- as 0006

-- As rebuild_aggregates_v2 (0009), over the v3 facts and the numeric daily rollup.
create function dashboard.rebuild_aggregates_v3(ids uuid[])
returns table (business_id uuid, rollup text, rows_repaired bigint)
language plpgsql as $$
#variable_conflict use_column
declare
    changed uuid[];
begin
    ids := array(select distinct i from unnest(ids) as i where i is not null);
    perform pg_advisory_xact_lock(4242000005);

    select coalesce(array_agg(coalesce(n.payment_id, o.payment_id)), '{}') into changed
      from (select * from dashboard.completed_payment_facts_v3 where business_id = any(ids)) as n
      full join (select * from dashboard.payment_facts where business_id = any(ids)) as o
        on o.payment_id = n.payment_id
     where n is distinct from o;
    perform dashboard.sync_payments_v3(changed);
    return query
    select f.business_id, 'payment_facts'::text, count(*)
      from dashboard.payment_facts f where f.payment_id = any(changed) group by 1;

    select coalesce(array_agg(coalesce(n.booking_id, o.booking_id)), '{}') into changed
      from (select id as booking_id, business_id, status, payment_status from bookings
             where business_id = any(ids)) as n
      full join (select * from dashboard.booking_facts where business_id = any(ids)) as o
        on o.booking_id = n.booking_id
     where n is distinct from o;
    perform dashboard.sync_bookings_v2(changed);
    return query
    select f.business_id, 'booking_facts'::text, count(*)
      from dashboard.booking_facts f where f.booking_id = any(changed) group by 1;

    return query
    with fresh as (
        select f.business_id, f.local_day as day, f.currency,
               sum(f.amount_minor) as revenue_minor, count(*) as payments_count
          from dashboard.payment_facts f where f.business_id = any(ids) group by 1, 2, 3
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id, coalesce(n.day, o.day) as day,
               coalesce(n.currency, o.currency) as currency, n.revenue_minor, n.payments_count,
               n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.revenue_daily where business_id = any(ids)) as o
            on o.business_id = n.business_id and o.day = n.day and o.currency = n.currency
         where (n.revenue_minor, n.payments_count) is distinct from (o.revenue_minor, o.payments_count)
    ), del as (
        delete from dashboard.revenue_daily r using diff d
         where d.stale and r.business_id = d.business_id and r.day = d.day and r.currency = d.currency
    ), up as (
        insert into dashboard.revenue_daily as r (business_id, day, currency, revenue_minor, payments_count)
        select business_id, day, currency, revenue_minor, payments_count from diff where not stale
        on conflict (business_id, day, currency) do update
           set revenue_minor = excluded.revenue_minor, payments_count = excluded.payments_count
    )
    select d.business_id, 'revenue_daily'::text, count(*) from diff d group by 1;

    return query
    with fresh as (
        select f.business_id, f.client_id, min(f.local_day) as first_paid_day
          from dashboard.payment_facts f
         where f.business_id = any(ids) and f.client_id is not null group by 1, 2
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id,
               coalesce(n.client_id, o.client_id) as client_id, n.first_paid_day, n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.business_clients where business_id = any(ids)) as o
            on o.business_id = n.business_id and o.client_id = n.client_id
         where n.first_paid_day is distinct from o.first_paid_day
    ), del as (
        delete from dashboard.business_clients c using diff d
         where d.stale and c.business_id = d.business_id and c.client_id = d.client_id
    ), up as (
        insert into dashboard.business_clients as c (business_id, client_id, first_paid_day)
        select business_id, client_id, first_paid_day from diff where not stale
        on conflict (business_id, client_id) do update set first_paid_day = excluded.first_paid_day
    )
    select d.business_id, 'business_clients'::text, count(*) from diff d group by 1;

    return query
    with fresh as (
        select i as business_id,
               (select count(distinct f.client_id) from dashboard.payment_facts f
                 where f.business_id = i and f.client_id is not null) as clients_total
          from unnest(ids) as i
    ), diff as (
        select n.business_id, n.clients_total
          from fresh n left join dashboard.business_client_totals o on o.business_id = n.business_id
         where n.clients_total is distinct from coalesce(o.clients_total, 0)
    ), up as (
        insert into dashboard.business_client_totals as t (business_id, clients_total)
        select business_id, clients_total from diff
        on conflict (business_id) do update set clients_total = excluded.clients_total
    )
    select d.business_id, 'business_client_totals'::text, count(*) from diff d group by 1;

    return query
    with fresh as (
        select f.business_id, f.status, f.payment_status, count(*) as bookings
          from dashboard.booking_facts f where f.business_id = any(ids) group by 1, 2, 3
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id, coalesce(n.status, o.status) as status,
               coalesce(n.payment_status, o.payment_status) as payment_status, n.bookings,
               n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.booking_counts where business_id = any(ids)) as o
            on o.business_id = n.business_id and o.status = n.status and o.payment_status = n.payment_status
         where n.bookings is distinct from o.bookings
    ), del as (
        delete from dashboard.booking_counts c using diff d
         where d.stale and c.business_id = d.business_id and c.status = d.status
           and c.payment_status = d.payment_status
    ), up as (
        insert into dashboard.booking_counts as c (business_id, status, payment_status, bookings)
        select business_id, status, payment_status, bookings from diff where not stale
        on conflict (business_id, status, payment_status) do update set bookings = excluded.bookings
    )
    select d.business_id, 'booking_counts'::text, count(*) from diff d group by 1;
end $$;

-- The batch as consume_changes_body_v1 (0008), keeping the figures with the v3 functions.
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
-- to dashboard.dead_letters with its error and the rest carry on. Same results as consume_changes_v1.
create function dashboard.consume_changes_isolated_v1(batch_size integer, new_state text, from_id bigint)
returns table (consumed integer, last_change_id bigint, events_appended integer, last_event_id bigint,
               dead_letters jsonb)
language plpgsql as $$
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
language plpgsql as $$
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

-- Plan once, no sequential scans, no JIT: as consume_changes_v1 (0007 says why).
alter function dashboard.consume_changes_v2(integer, text, bigint)
    set plan_cache_mode = force_generic_plan
    set enable_seqscan = off
    set jit = off;
alter function dashboard.consume_changes_isolated_v1(integer, text, bigint)
    set plan_cache_mode = force_generic_plan
    set enable_seqscan = off
    set jit = off;
