-- Incremental aggregates (docs/ARCHITECTURE.md, "Aggregates").
--
-- Measured on 1M payments over 10k businesses: `rebuild_aggregates_v1` recomputes a whole business, which costs
-- about 1 ms for a business with 90 payments but 700-900 ms for one with 100k payments (76k distinct clients),
-- and the listener would pay that on every batch that touches such a business. Here each completed payment and
-- each booking has a *fact*: what the rollups currently count for it. A change names only a row id; the old
-- fact and the row's current state give exact deltas, so one payment costs the same whatever the size of its
-- business. A full rebuild (manual refresh, `aggregates rebuild`, TRUNCATE) diffs the facts against the base
-- tables, then the rollups against the facts, and writes - and reports - only the differences.
--
-- Every maintenance function takes one transaction-level advisory lock, so the listener and a manual refresh
-- never compute deltas from the same old facts (which would count a change twice). Callers that also append
-- events take it before the events lock (4242000002), so the two never deadlock.
--
-- Figures depend on the business's timezone (local day and hour). Changing `businesses.timezone` is not a
-- captured change: run a refresh of that business afterwards (the refresh recomputes every fact).

-- What the rollups count for each completed payment. A payment that is not completed has no fact.
create table dashboard.payment_facts (
    payment_id   uuid primary key,
    business_id  uuid not null,
    currency     text not null,
    amount_minor bigint not null,
    client_id    uuid,
    local_day    date not null,          -- coalesce(paid_at, created_at) in the business's timezone
    local_hour   timestamptz not null    -- the start of that local hour
);
create index payment_facts_business_idx on dashboard.payment_facts (business_id);
-- A client's first completed payment to a business, without reading the business's other clients.
create index payment_facts_client_idx on dashboard.payment_facts (business_id, client_id, local_day)
    where client_id is not null;

-- What the booking counts count for each booking.
create table dashboard.booking_facts (
    booking_id     uuid primary key,
    business_id    uuid not null,
    status         text not null,
    payment_status text not null
);
create index booking_facts_business_idx on dashboard.booking_facts (business_id);

-- Completed revenue per local hour (the revenue series at hour granularity); hour_start is an instant, so
-- the two 01:00 hours of a DST fall-back stay apart.
create table dashboard.revenue_hourly (
    business_id    uuid not null,
    hour_start     timestamptz not null,
    currency       text not null,
    revenue_minor  bigint not null,
    payments_count bigint not null,
    primary key (business_id, hour_start, currency)
);

-- clients_total in one row: counting a large business's clients per request would cost tens of milliseconds.
create table dashboard.business_client_totals (
    business_id   uuid primary key,
    clients_total bigint not null
);

-- clients_new_today reads one day of one business.
create index business_clients_first_day_idx on dashboard.business_clients (business_id, first_paid_day);

-- The facts the base tables call for now: the single definition both the incremental and the full path use.
create view dashboard.completed_payment_facts_v2 as
select p.id as payment_id, p.business_id, p.currency, p.amount_minor, p.client_id,
       (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date as local_day,
       date_trunc('hour', coalesce(p.paid_at, p.created_at), b.timezone) as local_hour
  from payments p join businesses b on b.id = p.business_id
 where p.status = 'completed';

-- Bring the facts and rollups of these payments up to date by deltas: minus what was counted, plus what
-- counts now. Works for inserts, updates (status, amount, currency, client, time, business) and deletes alike.
create function dashboard.sync_payments_v2(ids uuid[]) returns void
language plpgsql as $$
declare
    pair_b uuid[];
    pair_c uuid[];
    zd_b   uuid[];
    zd_d   date[];
    zd_c   text[];
    zh_b   uuid[];
    zh_h   timestamptz[];
    zh_c   text[];
begin
    if coalesce(cardinality(ids), 0) = 0 then
        return;
    end if;
    perform pg_advisory_xact_lock(4242000005);

    -- One statement, one snapshot: the old facts, the current rows and the deltas agree.
    with old as (
        select * from dashboard.payment_facts where payment_id = any(ids)
    ), cur as (
        select * from dashboard.completed_payment_facts_v2 where payment_id = any(ids)
    ), moved as (
        select business_id, local_day, local_hour, currency, -amount_minor as amount, -1 as n from old
        union all
        select business_id, local_day, local_hour, currency, amount_minor, 1 from cur
    ), daily as (
        insert into dashboard.revenue_daily as r (business_id, day, currency, revenue_minor, payments_count)
        select business_id, local_day, currency, sum(amount)::bigint, sum(n)::bigint from moved group by 1, 2, 3
        on conflict (business_id, day, currency) do update
           set revenue_minor = r.revenue_minor + excluded.revenue_minor,
               payments_count = r.payments_count + excluded.payments_count
        returning r.business_id, r.day, r.currency, r.payments_count
    ), hourly as (
        insert into dashboard.revenue_hourly as r (business_id, hour_start, currency, revenue_minor, payments_count)
        select business_id, local_hour, currency, sum(amount)::bigint, sum(n)::bigint from moved group by 1, 2, 3
        on conflict (business_id, hour_start, currency) do update
           set revenue_minor = r.revenue_minor + excluded.revenue_minor,
               payments_count = r.payments_count + excluded.payments_count
        returning r.business_id, r.hour_start, r.currency, r.payments_count
    ), upserted as (
        insert into dashboard.payment_facts as f select * from cur
        on conflict (payment_id) do update
           set business_id = excluded.business_id, currency = excluded.currency,
               amount_minor = excluded.amount_minor, client_id = excluded.client_id,
               local_day = excluded.local_day, local_hour = excluded.local_hour
        returning 1
    ), removed as (
        delete from dashboard.payment_facts f
         where f.payment_id = any(ids) and not exists (select 1 from cur where cur.payment_id = f.payment_id)
        returning 1
    ), pairs as (
        select business_id, client_id from old where client_id is not null
        union
        select business_id, client_id from cur where client_id is not null
    ), zd as (
        select * from daily where payments_count = 0
    ), zh as (
        select * from hourly where payments_count = 0
    )
    select (select coalesce(array_agg(business_id order by business_id, client_id), '{}') from pairs),
           (select coalesce(array_agg(client_id order by business_id, client_id), '{}') from pairs),
           (select coalesce(array_agg(business_id order by business_id, day, currency), '{}') from zd),
           (select coalesce(array_agg(day order by business_id, day, currency), '{}') from zd),
           (select coalesce(array_agg(currency order by business_id, day, currency), '{}') from zd),
           (select coalesce(array_agg(business_id order by business_id, hour_start, currency), '{}') from zh),
           (select coalesce(array_agg(hour_start order by business_id, hour_start, currency), '{}') from zh),
           (select coalesce(array_agg(currency order by business_id, hour_start, currency), '{}') from zh)
      into pair_b, pair_c, zd_b, zd_d, zd_c, zh_b, zh_h, zh_c;

    -- A bucket whose last payment left holds nothing: drop it rather than keep a zero row.
    delete from dashboard.revenue_daily r using unnest(zd_b, zd_d, zd_c) as z(b, d, c)
     where r.business_id = z.b and r.day = z.d and r.currency = z.c and r.payments_count = 0;
    delete from dashboard.revenue_hourly r using unnest(zh_b, zh_h, zh_c) as z(b, h, c)
     where r.business_id = z.b and r.hour_start = z.h and r.currency = z.c and r.payments_count = 0;

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

-- The same for bookings: counts by (status, payment_status).
create function dashboard.sync_bookings_v2(ids uuid[]) returns void
language plpgsql as $$
declare
    z_b uuid[];
    z_s text[];
    z_p text[];
begin
    if coalesce(cardinality(ids), 0) = 0 then
        return;
    end if;
    perform pg_advisory_xact_lock(4242000005);

    with old as (
        select * from dashboard.booking_facts where booking_id = any(ids)
    ), cur as (
        select id as booking_id, business_id, status, payment_status from bookings where id = any(ids)
    ), moved as (
        select business_id, status, payment_status, -1 as n from old
        union all
        select business_id, status, payment_status, 1 from cur
    ), counted as (
        insert into dashboard.booking_counts as c (business_id, status, payment_status, bookings)
        select business_id, status, payment_status, sum(n)::bigint from moved group by 1, 2, 3
        on conflict (business_id, status, payment_status) do update set bookings = c.bookings + excluded.bookings
        returning c.business_id, c.status, c.payment_status, c.bookings
    ), upserted as (
        insert into dashboard.booking_facts as f select * from cur
        on conflict (booking_id) do update
           set business_id = excluded.business_id, status = excluded.status, payment_status = excluded.payment_status
        returning 1
    ), removed as (
        delete from dashboard.booking_facts f
         where f.booking_id = any(ids) and not exists (select 1 from cur where cur.booking_id = f.booking_id)
        returning 1
    ), z as (
        select * from counted where bookings = 0
    )
    select coalesce(array_agg(business_id order by business_id, status, payment_status), '{}'),
           coalesce(array_agg(status order by business_id, status, payment_status), '{}'),
           coalesce(array_agg(payment_status order by business_id, status, payment_status), '{}')
      into z_b, z_s, z_p
      from z;

    delete from dashboard.booking_counts c using unnest(z_b, z_s, z_p) as z(b, s, p)
     where c.business_id = z.b and c.status = z.s and c.payment_status = z.p and c.bookings = 0;
end $$;

-- The listener's entry point: the (table, row id) of every change in a batch, as cdc.change_log has them.
-- Rows of tables that feed no figure, and row ids that are not UUIDs (an application's own tracked tables),
-- are ignored.
create function dashboard.apply_changes_v2(tables text[], row_ids text[]) returns void
language plpgsql as $$
declare
    pay  uuid[];
    book uuid[];
begin
    select coalesce(array_agg(distinct r::uuid) filter (where t in ('public.payments', 'payments')), '{}'),
           coalesce(array_agg(distinct r::uuid) filter (where t in ('public.bookings', 'bookings')), '{}')
      into pay, book
      from unnest(tables, row_ids) as c(t, r)
     where r ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';
    perform dashboard.sync_payments_v2(pay);
    perform dashboard.sync_bookings_v2(book);
end $$;

-- Recompute these businesses from the base tables; returns the rows it had to repair (none when the
-- incremental path was exact). Facts first (a payment that moved between businesses goes through
-- sync_payments_v2, which also corrects the business it left), then every rollup against the facts.
create function dashboard.rebuild_aggregates_v2(ids uuid[])
returns table (business_id uuid, rollup text, rows_repaired bigint)
language plpgsql as $$
#variable_conflict use_column
declare
    changed uuid[];
begin
    ids := array(select distinct i from unnest(ids) as i where i is not null);
    perform pg_advisory_xact_lock(4242000005);

    select coalesce(array_agg(coalesce(n.payment_id, o.payment_id)), '{}') into changed
      from (select * from dashboard.completed_payment_facts_v2 where business_id = any(ids)) as n
      full join (select * from dashboard.payment_facts where business_id = any(ids)) as o
        on o.payment_id = n.payment_id
     where n is distinct from o;
    perform dashboard.sync_payments_v2(changed);
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
               sum(f.amount_minor)::bigint as revenue_minor, count(*) as payments_count
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
        select f.business_id, f.local_hour as hour_start, f.currency,
               sum(f.amount_minor)::bigint as revenue_minor, count(*) as payments_count
          from dashboard.payment_facts f where f.business_id = any(ids) group by 1, 2, 3
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id,
               coalesce(n.hour_start, o.hour_start) as hour_start,
               coalesce(n.currency, o.currency) as currency, n.revenue_minor, n.payments_count,
               n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.revenue_hourly where business_id = any(ids)) as o
            on o.business_id = n.business_id and o.hour_start = n.hour_start and o.currency = n.currency
         where (n.revenue_minor, n.payments_count) is distinct from (o.revenue_minor, o.payments_count)
    ), del as (
        delete from dashboard.revenue_hourly r using diff d
         where d.stale and r.business_id = d.business_id and r.hour_start = d.hour_start
           and r.currency = d.currency
    ), up as (
        insert into dashboard.revenue_hourly as r (business_id, hour_start, currency, revenue_minor, payments_count)
        select business_id, hour_start, currency, revenue_minor, payments_count from diff where not stale
        on conflict (business_id, hour_start, currency) do update
           set revenue_minor = excluded.revenue_minor, payments_count = excluded.payments_count
    )
    select d.business_id, 'revenue_hourly'::text, count(*) from diff d group by 1;

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

-- A listener that still calls v1 (a rolling deploy) keeps facts and rollups consistent: v1 becomes the full,
-- diffing rebuild. The listener should call apply_changes_v2 instead (constant cost per change).
create or replace function dashboard.rebuild_aggregates_v1(ids uuid[]) returns void
language plpgsql as $$
begin
    perform dashboard.rebuild_aggregates_v2(ids);
end $$;

-- Start from facts that match the base tables: rebuild every existing business once.
truncate dashboard.revenue_daily, dashboard.business_clients, dashboard.booking_counts;
select count(*) from dashboard.rebuild_aggregates_v2(array(select id from businesses));
