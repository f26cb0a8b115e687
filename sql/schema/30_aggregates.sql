-- Aggregates: precomputed figures per business, kept exact by the listener (docs/ARCHITECTURE.md,
-- "Aggregates"; definitions: DESIGN.md, "Figure definitions").
--
-- Each completed payment and each booking has a *fact*: what the rollups currently count for it. A change
-- names only a row id; the old fact and the row's current state give exact deltas, so one payment costs the
-- same whatever the size of its business (sync_*). A rebuild (manual refresh, `aggregates rebuild`, TRUNCATE)
-- diffs the facts against the base tables, then the rollups against the facts, and writes - and reports - only
-- the differences (rebuild_*).
--
-- Every maintenance function takes the transaction-level advisory lock 4242000005, so the listener and a
-- manual refresh never compute deltas from the same old facts; callers that also append events take it before
-- the events lock (4242000002), so the two never deadlock.
--
-- Figures depend on the business's timezone (local day and hour). Changing `businesses.timezone` is not a
-- captured change: refresh that business afterwards (the refresh recomputes every fact).

-- Completed revenue (net of refunds) per local day and currency; numeric, so a day sums exactly whatever the
-- tables hold.
create table dashboard.revenue_daily (
    business_id    uuid not null,
    day            date not null,
    currency       text not null,
    revenue_minor  numeric not null,
    payments_count bigint not null,
    primary key (business_id, day, currency)
);

-- Each client that has a completed payment to the business, with the local day of the first one.
create table dashboard.business_clients (
    business_id    uuid not null,
    client_id      uuid not null,
    first_paid_day date not null,
    primary key (business_id, client_id)
);

create table dashboard.booking_counts (
    business_id    uuid not null,
    status         text not null,
    payment_status text not null,
    bookings       bigint not null,
    primary key (business_id, status, payment_status)
);

-- What the rollups count for each completed payment (its amount net of refunds). A payment that is not
-- completed has no fact. The hour series is read from the facts, through their (business, local hour) index.
create table dashboard.payment_facts (
    payment_id   uuid primary key,
    business_id  uuid not null,
    currency     text not null,
    amount_minor bigint not null,
    client_id    uuid,
    local_day    date not null,          -- coalesce(paid_at, created_at) in the business's timezone
    local_hour   timestamptz not null    -- the start of that local hour
);
create index payment_facts_business_hour_idx on dashboard.payment_facts (business_id, local_hour);
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

-- clients_total in one row: counting a large business's clients per request would cost tens of milliseconds.
create table dashboard.business_client_totals (
    business_id   uuid primary key,
    clients_total bigint not null
);

-- clients_new_today reads one day of one business.
create index business_clients_first_day_idx on dashboard.business_clients (business_id, first_paid_day);

-- Completed revenue per local hour: hour_start is an instant, so the two 01:00 hours of a DST fall-back stay
-- apart. A view over the facts: the series is bounded and read far less often than payments are written.
create view dashboard.revenue_hourly as
select business_id, local_hour as hour_start, currency, sum(amount_minor) as revenue_minor,
       count(*)::bigint as payments_count
  from dashboard.payment_facts
 group by business_id, local_hour, currency;


-- The facts the base tables call for now: the single definition both the incremental and the full path use.
create view dashboard.completed_payment_facts_v3 as
select p.id as payment_id, p.business_id, p.currency, p.amount_minor - p.refunded_minor as amount_minor,
       p.client_id,
       (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date as local_day,
       date_trunc('hour', coalesce(p.paid_at, p.created_at), b.timezone) as local_hour
  from payments p join businesses b on b.id = p.business_id
 where p.status = 'completed';


-- Bring the facts and rollups of these payments up to date by deltas: minus what was counted, plus what
-- counts now. Works for inserts, updates (status, amount, refund, currency, client, time, business) and deletes
-- alike. Facts that no longer count are found by a set difference (EXCEPT), never by a join of two batch-sized
-- sets: under generic plans such a join becomes a nested loop, quadratic in the batch. Generic plans: the
-- statements are fixed-shape probes by key with different arrays each time, and planning them anew would cost
-- more than running them.
create function dashboard.sync_payments_v3(ids uuid[]) returns void
language plpgsql
set plan_cache_mode = force_generic_plan
as $$
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

-- The same for bookings: counts by (status, payment_status).
create function dashboard.sync_bookings_v2(ids uuid[]) returns void
language plpgsql
set plan_cache_mode = force_generic_plan
as $$
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
         where f.booking_id = any(array(select booking_id from old except select booking_id from cur))
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

-- Recompute these businesses from the base tables through the incremental functions; returns the rows it had
-- to repair (none when the incremental path was exact). The listener's TRUNCATE path calls it for every
-- business in one call.
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

-- The same result as rebuild_aggregates_v3, linear in the ledger when called chunk by chunk (`aggregates
-- rebuild`, manual refresh): facts that differ are deleted and written afresh, without the listener's delta
-- functions (their generic plans, made for small batches, turn a large repair quadratic); the rollups of the
-- chunk's businesses, and of any business a changed fact left or entered, are recomputed from the facts and
-- only their differences written. Custom plans (the chunk's ids are constants), no sequential scans (each chunk
-- reaches its rows through the business indexes, whatever the statistics say), no JIT (short statements).
create function dashboard.rebuild_aggregates_v4(ids uuid[])
returns table (business_id uuid, rollup text, rows_repaired bigint)
language plpgsql
set plan_cache_mode = force_custom_plan
set enable_seqscan = off
set jit = off
as $$
#variable_conflict use_column
declare
    drop_ids uuid[];         -- facts to delete: every fact that differs, wherever it is
    away_ids uuid[];         -- facts of the chunk whose row is not a completed payment of the chunk now
    n_id     uuid[];         -- the facts to write, as the rows call for them
    n_biz    uuid[];
    n_cur    text[];
    n_amount bigint[];
    n_client uuid[];
    n_day    date[];
    n_hour   timestamptz[];
    n_status text[];
    n_pay    text[];
    old_p    uuid[];
    old_b    uuid[];
    new_p    uuid[];
    new_b    uuid[];
    touched  uuid[];
begin
    ids := array(select distinct i from unnest(ids) as i where i is not null order by 1);
    touched := ids;
    perform pg_advisory_xact_lock(4242000005);

    -- Payment facts that differ from what the chunk's rows call for now, with the facts to write.
    select coalesce(array_agg(coalesce(n.payment_id, o.payment_id)), '{}'),
           coalesce(array_agg(o.payment_id) filter (where n.payment_id is null), '{}'),
           coalesce(array_agg(n.payment_id) filter (where n.payment_id is not null), '{}'),
           coalesce(array_agg(n.business_id) filter (where n.payment_id is not null), '{}'),
           coalesce(array_agg(n.currency) filter (where n.payment_id is not null), '{}'),
           coalesce(array_agg(n.amount_minor) filter (where n.payment_id is not null), '{}'),
           coalesce(array_agg(n.client_id) filter (where n.payment_id is not null), '{}'),
           coalesce(array_agg(n.local_day) filter (where n.payment_id is not null), '{}'),
           coalesce(array_agg(n.local_hour) filter (where n.payment_id is not null), '{}')
      into drop_ids, away_ids, n_id, n_biz, n_cur, n_amount, n_client, n_day, n_hour
      from (select * from dashboard.completed_payment_facts_v3 where business_id = any(ids)) as n
      full join (select * from dashboard.payment_facts where business_id = any(ids)) as o
        on o.payment_id = n.payment_id
     where n is distinct from o;
    if cardinality(drop_ids) > 0 then
        with gone as (
            delete from dashboard.payment_facts f where f.payment_id = any(drop_ids)
            returning f.payment_id, f.business_id
        )
        select coalesce(array_agg(payment_id), '{}'), coalesce(array_agg(business_id), '{}')
          into old_p, old_b from gone;
        with made as (
            insert into dashboard.payment_facts
                   (payment_id, business_id, currency, amount_minor, client_id, local_day, local_hour)
            select * from (
                select * from unnest(n_id, n_biz, n_cur, n_amount, n_client, n_day, n_hour)
                union all
                -- a payment that left the chunk's businesses and counts in another one now
                select payment_id, business_id, currency, amount_minor, client_id, local_day, local_hour
                  from dashboard.completed_payment_facts_v3 where payment_id = any(away_ids)
            ) as f(payment_id, business_id, currency, amount_minor, client_id, local_day, local_hour)
            order by business_id, local_hour  -- (index order: the chunk's pages, once each)
            returning payment_id, business_id
        )
        select coalesce(array_agg(payment_id), '{}'), coalesce(array_agg(business_id), '{}')
          into new_p, new_b from made;
        -- Each repaired fact once, under the business it counts for now (or counted for, if none).
        return query
        select coalesce(n.b, o.b), 'payment_facts'::text, count(*)
          from unnest(new_p, new_b) as n(p, b) full join unnest(old_p, old_b) as o(p, b) on o.p = n.p
         group by 1;
        touched := touched || old_b || new_b;
    end if;

    -- Booking facts likewise.
    select coalesce(array_agg(coalesce(n.booking_id, o.booking_id)), '{}'),
           coalesce(array_agg(o.booking_id) filter (where n.booking_id is null), '{}'),
           coalesce(array_agg(n.booking_id) filter (where n.booking_id is not null), '{}'),
           coalesce(array_agg(n.business_id) filter (where n.booking_id is not null), '{}'),
           coalesce(array_agg(n.status) filter (where n.booking_id is not null), '{}'),
           coalesce(array_agg(n.payment_status) filter (where n.booking_id is not null), '{}')
      into drop_ids, away_ids, n_id, n_biz, n_status, n_pay
      from (select id as booking_id, business_id, status, payment_status from bookings
             where business_id = any(ids)) as n
      full join (select * from dashboard.booking_facts where business_id = any(ids)) as o
        on o.booking_id = n.booking_id
     where n is distinct from o;
    if cardinality(drop_ids) > 0 then
        with gone as (
            delete from dashboard.booking_facts f where f.booking_id = any(drop_ids)
            returning f.booking_id, f.business_id
        )
        select coalesce(array_agg(booking_id), '{}'), coalesce(array_agg(business_id), '{}')
          into old_p, old_b from gone;
        with made as (
            insert into dashboard.booking_facts (booking_id, business_id, status, payment_status)
            select * from (
                select * from unnest(n_id, n_biz, n_status, n_pay)
                union all
                select id, business_id, status, payment_status from bookings where id = any(away_ids)
            ) as f(booking_id, business_id, status, payment_status)
            order by business_id
            returning booking_id, business_id
        )
        select coalesce(array_agg(booking_id), '{}'), coalesce(array_agg(business_id), '{}')
          into new_p, new_b from made;
        return query
        select coalesce(n.b, o.b), 'booking_facts'::text, count(*)
          from unnest(new_p, new_b) as n(p, b) full join unnest(old_p, old_b) as o(p, b) on o.p = n.p
         group by 1;
        touched := touched || old_b || new_b;
    end if;

    if cardinality(touched) > cardinality(ids) then
        touched := array(select distinct i from unnest(touched) as i order by 1);
    end if;

    -- The rollups of those businesses against their facts (as v3).
    return query
    with fresh as (
        select f.business_id, f.local_day as day, f.currency,
               sum(f.amount_minor) as revenue_minor, count(*) as payments_count
          from dashboard.payment_facts f where f.business_id = any(touched) group by 1, 2, 3
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id, coalesce(n.day, o.day) as day,
               coalesce(n.currency, o.currency) as currency, n.revenue_minor, n.payments_count,
               n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.revenue_daily where business_id = any(touched)) as o
            on o.business_id = n.business_id and o.day = n.day and o.currency = n.currency
         where (n.revenue_minor, n.payments_count) is distinct from (o.revenue_minor, o.payments_count)
    ), del as (
        delete from dashboard.revenue_daily r using diff d
         where d.stale and r.business_id = d.business_id and r.day = d.day and r.currency = d.currency
    ), up as (
        insert into dashboard.revenue_daily as r (business_id, day, currency, revenue_minor, payments_count)
        select business_id, day, currency, revenue_minor, payments_count from diff where not stale
         order by business_id, day, currency
        on conflict (business_id, day, currency) do update
           set revenue_minor = excluded.revenue_minor, payments_count = excluded.payments_count
    )
    select d.business_id, 'revenue_daily'::text, count(*) from diff d group by 1;

    -- Clients and their count from one aggregation of the facts.
    return query
    with fresh as (
        select f.business_id, f.client_id, min(f.local_day) as first_paid_day
          from dashboard.payment_facts f
         where f.business_id = any(touched) and f.client_id is not null group by 1, 2
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id,
               coalesce(n.client_id, o.client_id) as client_id, n.first_paid_day, n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.business_clients where business_id = any(touched)) as o
            on o.business_id = n.business_id and o.client_id = n.client_id
         where n.first_paid_day is distinct from o.first_paid_day
    ), del as (
        delete from dashboard.business_clients c using diff d
         where d.stale and c.business_id = d.business_id and c.client_id = d.client_id
    ), up as (
        insert into dashboard.business_clients as c (business_id, client_id, first_paid_day)
        select business_id, client_id, first_paid_day from diff where not stale
         order by business_id, client_id
        on conflict (business_id, client_id) do update set first_paid_day = excluded.first_paid_day
    ), counted as (
        select t.b as business_id, coalesce(c.n, 0) as clients_total,
               (select o.clients_total from dashboard.business_client_totals o where o.business_id = t.b) as held
          from unnest(touched) as t(b)
          left join (select business_id, count(*) as n from fresh group by 1) as c on c.business_id = t.b
    ), totals as (
        select business_id, clients_total from counted where clients_total is distinct from coalesce(held, 0)
    ), up_totals as (
        insert into dashboard.business_client_totals as t (business_id, clients_total)
        select business_id, clients_total from totals order by business_id
        on conflict (business_id) do update set clients_total = excluded.clients_total
    )
    select d.business_id, 'business_clients'::text, count(*) from diff d group by 1
    union all
    select t.business_id, 'business_client_totals'::text, 1 from totals t;

    return query
    with fresh as (
        select f.business_id, f.status, f.payment_status, count(*) as bookings
          from dashboard.booking_facts f where f.business_id = any(touched) group by 1, 2, 3
    ), diff as (
        select coalesce(n.business_id, o.business_id) as business_id, coalesce(n.status, o.status) as status,
               coalesce(n.payment_status, o.payment_status) as payment_status, n.bookings,
               n.business_id is null as stale
          from fresh n
          full join (select * from dashboard.booking_counts where business_id = any(touched)) as o
            on o.business_id = n.business_id and o.status = n.status and o.payment_status = n.payment_status
         where n.bookings is distinct from o.bookings
    ), del as (
        delete from dashboard.booking_counts c using diff d
         where d.stale and c.business_id = d.business_id and c.status = d.status
           and c.payment_status = d.payment_status
    ), up as (
        insert into dashboard.booking_counts as c (business_id, status, payment_status, bookings)
        select business_id, status, payment_status, bookings from diff where not stale
         order by business_id, status, payment_status
        on conflict (business_id, status, payment_status) do update set bookings = excluded.bookings
    )
    select d.business_id, 'booking_counts'::text, count(*) from diff d group by 1;
end $$;
