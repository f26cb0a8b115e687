-- Lighter aggregate maintenance for the listener's batch (docs/ARCHITECTURE.md, "Aggregates").
--
-- 1. The hour series is read from the facts; no hourly rollup to maintain. Every completed payment moved three
--    rows: its fact, its daily bucket and its hourly bucket. The hourly bucket served only the revenue series at
--    hour granularity, which is bounded to 2,000 buckets (83 days) and read far less often than payments are
--    written. Measured (catch-up of 12,000 payments over 1,000 businesses, median of 9 alternating runs): 62 ->
--    54 us of listener backend CPU per change without it. The facts' index on the business becomes (business,
--    local hour): the series reads one index range, and the facts still have one secondary index for the
--    business. `dashboard.revenue_hourly` stays, as a view with the table's columns: the same rows the table
--    held (hours with at least one completed payment), for the figures query and any reader of the old table.
--
-- 2. No join of one batch-sized set to another. The facts a batch no longer counts were found by an anti-join
--    of the old facts with the batch's current rows; under the listener's generic plans, made once per
--    connection and often while the tables were empty, that join is a nested loop: quadratic in the batch (a
--    bulk correction of 12,000 completed payments, consumed in batches of 5,000: 6.1 s). Replacing the other
--    side by an index probe was worse (the plan materialised every payment, 5.5 s per batch). A set
--    difference (EXCEPT) has no join to choose: hashed or sorted, it is linear (0.45 s). The same for bookings.
--
-- Measured: docs/BENCHMARKS.md, "2026-11-27, third session".

drop table dashboard.revenue_hourly;
drop index dashboard.payment_facts_business_idx;
create index payment_facts_business_hour_idx on dashboard.payment_facts (business_id, local_hour);

create view dashboard.revenue_hourly as
select business_id, local_hour as hour_start, currency, sum(amount_minor)::bigint as revenue_minor,
       count(*)::bigint as payments_count
  from dashboard.payment_facts
 group by business_id, local_hour, currency;

-- As in 0005, without the hourly rollup, and finding facts that no longer count by index probes.
create or replace function dashboard.sync_payments_v2(ids uuid[]) returns void
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
        select * from dashboard.completed_payment_facts_v2 where payment_id = any(ids)
    ), moved as (
        select business_id, local_day, currency, -amount_minor as amount, -1 as n from old
        union all
        select business_id, local_day, currency, amount_minor, 1 from cur
    ), daily as (
        insert into dashboard.revenue_daily as r (business_id, day, currency, revenue_minor, payments_count)
        select business_id, local_day, currency, sum(amount)::bigint, sum(n)::bigint from moved group by 1, 2, 3
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

alter function dashboard.sync_payments_v2(uuid[]) set plan_cache_mode = force_generic_plan;  -- as 0006 set it

-- As in 0005, with the same change to finding facts that no longer count.
create or replace function dashboard.sync_bookings_v2(ids uuid[]) returns void
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

alter function dashboard.sync_bookings_v2(uuid[]) set plan_cache_mode = force_generic_plan;  -- as 0006 set it

-- As in 0005, without the hourly rollup.
create or replace function dashboard.rebuild_aggregates_v2(ids uuid[])
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
