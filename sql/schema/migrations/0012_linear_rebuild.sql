-- A rebuild linear in the ledger (issue 14, part 5; docs/ARCHITECTURE.md, "Rebuilding every business";
-- docs/BENCHMARKS.md, "Aggregates rebuild").
--
-- `cdc-dashboard aggregates rebuild` walks the businesses in chunks (src/cdc_dashboard/figures.py), one
-- transaction per chunk, each calling a rebuild function with that chunk's ids. rebuild_aggregates_v3 (0010, as
-- v2 before it) is not linear per chunk once the aggregates have much to repair (a ledger loaded with capture
-- disabled, a restore, a lost rollup), which is when a rebuild is run: it hands every fact that differs to
-- sync_payments_v3, the listener's per-batch function, which runs with `plan_cache_mode = force_generic_plan`
-- (0006). Those plans are made once per connection, for a batch estimated at ten rows, and on a rebuild while
-- the facts are still empty: a sequential scan of dashboard.payment_facts filtered by `payment_id = any($1)`
-- (a generic plan cannot hash the array: every row is compared with every id of the chunk), and a nested loop
-- of the chunk's clients over all of dashboard.business_clients. Each chunk then costs (facts so far) x
-- (chunk's payments). Measured (bench/rebuild.py, capture-disabled load of 100k payments over 10k businesses,
-- chunks of 200 businesses): 269 s, against 3.8 s for the same command when nothing needed repair.
--
-- rebuild_aggregates_v4 has v3's signature, result and figures (the same facts view, the same rollups, the same
-- rows reported; a fact that was missing or stale is no longer also reported as a revenue_daily repair when
-- the rollup already agreed), without deltas and without the listener's functions:
-- 1. The chunk's payment facts are diffed against the facts view as before, and the facts that differ are
--    deleted and written afresh from that same diff (an id probe only for a payment that left the chunk's
--    businesses), in index order.
-- 2. The rollups of the chunk's businesses, and of any business a changed fact left or entered, are recomputed
--    from the facts and diffed against what they hold; only the differences are written and reported. A
--    business outside the chunk is thus never left with rollups that disagree with its facts (what the
--    listener's deltas rely on). clients_total comes from the same aggregation as business_clients.
-- 3. Bookings likewise.
-- 4. Every statement is planned for the arrays it gets (`force_custom_plan`: the chunk's ids are constants),
--    without sequential scans (`enable_seqscan = off`: a scan per chunk is what makes a chunked rebuild
--    quadratic; whatever the statistics say, each chunk reaches its rows through the business indexes) and
--    without JIT (short statements). Per-business probes (client totals) go by primary key.
--
-- Same lock as every maintenance function (4242000005): the listener waits for a chunk, never for the whole
-- rebuild. v3 stays, unchanged: the listener's TRUNCATE path calls it for every business in one call.

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
