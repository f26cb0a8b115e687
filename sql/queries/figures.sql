-- Queries of the figures endpoints and of manual refresh (asyncpg, $n parameters).
--
-- Every read is ONE statement: it reads the rollups and `dashboard.listener_state.last_event_id` in the same
-- snapshot. The listener updates the rollups and appends the events in one transaction, so the figures are
-- exactly those as of that event id (`as_of_event_id`). Lists read the base tables: they are at least as of
-- that id (a row committed a moment ago may already show; its event will follow).

-- stats --
-- $1 business ids (uuid[]): one row per id, in the order given; `found` is false for an unknown business. One
-- statement for any number of businesses, so every row is as of the same event (`as_of_event_id`, read once):
-- `GET /stats` reads one business with it, and the gateway the businesses of a batch of events it is about to
-- deliver with the figures spliced in (gateway/pushed_figures.py), one round trip for the whole batch.
select (select last_event_id from dashboard.listener_state) as as_of_event_id,
       ids.id as business_id, b.id is not null as found, b.name, b.timezone, b.created_at, b.today,
       jsonb_build_object(
           'revenue', coalesce(rev.by_currency, '{}'),
           'payments_count', coalesce(rev.payments_count, 0),
           'clients_total', coalesce((select t.clients_total from dashboard.business_client_totals t
                                       where t.business_id = b.id), 0),
           'clients_new_today', (select count(*) from dashboard.business_clients c
                                  where c.business_id = b.id and c.first_paid_day = b.today),
           'bookings', jsonb_build_object(
               'by_status', coalesce((select jsonb_object_agg(status, n) from (
                                          select status, sum(bookings)::bigint as n from dashboard.booking_counts
                                           where business_id = b.id group by status) s), '{}'),
               'by_payment_status', coalesce((select jsonb_object_agg(payment_status, n) from (
                                          select payment_status, sum(bookings)::bigint as n
                                            from dashboard.booking_counts
                                           where business_id = b.id group by payment_status) s), '{}'))
       )::text as figures
  -- The LIMIT changes no result; it fixes the row estimate. Without it a plan made for the given ids counts
  -- them (one for GET /stats) while the cached generic plan guesses 10, so PostgreSQL plans every execution
  -- anew (which costs about as much as the read itself); with it both count one, and the generic plan is kept
  -- and reused for any number of ids (its low estimate also keeps a thousand-id batch from being JIT-compiled).
  from (select * from unnest($1::uuid[]) with ordinality as u(id, ord) limit cardinality($1::uuid[])) as ids
  left join lateral (
      -- offset 0 keeps this subquery from being pulled up, so `today` (a time zone conversion) is computed once
      -- per business rather than in every filter below for every row of revenue_daily (one a day: years of them).
      select id, name, timezone, created_at, (now() at time zone timezone)::date as today
        from businesses where id = ids.id
      offset 0
  ) as b on true
  left join lateral (
      select jsonb_object_agg(r.currency, jsonb_build_object(
                 'total_minor', r.total_minor, 'today_minor', r.today_minor, 'month_minor', r.month_minor))
                 as by_currency,
             sum(r.payments_count)::bigint as payments_count
        from (select d.currency,
                     -- numeric: exact for any sum
                     sum(d.revenue_minor) as total_minor,
                     coalesce(sum(d.revenue_minor) filter (where d.day = b.today), 0) as today_minor,
                     coalesce(sum(d.revenue_minor) filter (
                         where d.day >= date_trunc('month', b.today)::date
                           and d.day < (date_trunc('month', b.today) + interval '1 month')::date), 0) as month_minor,
                     sum(d.payments_count)::bigint as payments_count
                from dashboard.revenue_daily d
               where d.business_id = b.id
               group by d.currency) as r
  ) as rev on true
 order by ids.ord

-- business_timezone --
select timezone from businesses where id = $1

-- revenue_hourly --
-- $1 business, [$2, $3) hour starts. One row with nulls when the range is empty (as_of_event_id still).
select ls.last_event_id as as_of_event_id, r.hour_start as bucket, r.currency, r.revenue_minor, r.payments_count
  from dashboard.listener_state ls
  left join dashboard.revenue_hourly r on r.business_id = $1 and r.hour_start >= $2 and r.hour_start < $3
 order by r.hour_start, r.currency

-- revenue_daily --
-- $1 business, [$2, $3] local days.
select ls.last_event_id as as_of_event_id, r.day as bucket, r.currency, r.revenue_minor, r.payments_count
  from dashboard.listener_state ls
  left join dashboard.revenue_daily r on r.business_id = $1 and r.day >= $2 and r.day <= $3
 order by r.day, r.currency

-- revenue_monthly --
-- $1 business, [$2, $3] local days (first of the first month, last day of the last month).
select ls.last_event_id as as_of_event_id, m.bucket, m.currency, m.revenue_minor, m.payments_count
  from dashboard.listener_state ls
  left join lateral (
      select date_trunc('month', r.day)::date as bucket, r.currency,
             sum(r.revenue_minor) as revenue_minor, sum(r.payments_count)::bigint as payments_count
        from dashboard.revenue_daily r
       where r.business_id = $1 and r.day >= $2 and r.day <= $3
       group by 1, 2
  ) as m on true
 order by m.bucket, m.currency

-- transactions --
-- Recent payments by when they happened (paid, else created), with the client's name and the method.
-- $1 business, ($2, $3) keyset cursor (strictly before), $4 limit. Index: payments_business_time_idx.
select ls.last_event_id as as_of_event_id, t.sort_at, t.id, t.item
  from dashboard.listener_state ls
  left join lateral (
      select coalesce(p.paid_at, p.created_at) as sort_at, p.id,
             jsonb_build_object(
                 'id', p.id, 'amount_minor', p.amount_minor, 'refunded_minor', p.refunded_minor,
                 'currency', p.currency, 'method', p.method, 'status', p.status, 'client_id', p.client_id, 'client_name', c.name, 'booking_id', p.booking_id,
                 'provider', p.provider, 'provider_reference', p.provider_reference,
                 'at', coalesce(p.paid_at, p.created_at), 'paid_at', p.paid_at, 'created_at', p.created_at
             )::text as item
        from payments p left join clients c on c.id = p.client_id
       where p.business_id = $1 and (coalesce(p.paid_at, p.created_at), p.id) < ($2::timestamptz, $3::uuid)
       order by coalesce(p.paid_at, p.created_at) desc, p.id desc
       limit $4
  ) as t on true
 order by t.sort_at desc, t.id desc

-- payments --
-- $1 business, ($2, $3) keyset cursor, $4 limit. Index: payments_business_created_idx.
select ls.last_event_id as as_of_event_id, t.sort_at, t.id, t.item
  from dashboard.listener_state ls
  left join lateral (
      select p.created_at as sort_at, p.id,
             jsonb_build_object(
                 'id', p.id, 'client_id', p.client_id, 'booking_id', p.booking_id,
                 'amount_minor', p.amount_minor, 'refunded_minor', p.refunded_minor, 'currency', p.currency,
                 'method', p.method, 'status', p.status,
                 'provider', p.provider, 'provider_reference', p.provider_reference, 'paid_at', p.paid_at,
                 'created_at', p.created_at, 'updated_at', p.updated_at
             )::text as item
        from payments p
       where p.business_id = $1 and (p.created_at, p.id) < ($2::timestamptz, $3::uuid)
       order by p.created_at desc, p.id desc
       limit $4
  ) as t on true
 order by t.sort_at desc, t.id desc

-- payment_transactions --
-- $1 business, ($2, $3) keyset cursor, $4 limit. `raw` (the provider's body) stays out of the page.
select ls.last_event_id as as_of_event_id, t.sort_at, t.id, t.item
  from dashboard.listener_state ls
  left join lateral (
      select x.created_at as sort_at, x.id,
             jsonb_build_object(
                 'id', x.id, 'payment_id', x.payment_id, 'provider', x.provider, 'amount_minor', x.amount_minor,
                 'currency', x.currency, 'status', x.status, 'created_at', x.created_at,
                 'updated_at', x.updated_at
             )::text as item
        from payment_transactions x
       where x.business_id = $1 and (x.created_at, x.id) < ($2::timestamptz, $3::uuid)
       order by x.created_at desc, x.id desc
       limit $4
  ) as t on true
 order by t.sort_at desc, t.id desc

-- client_business_transactions --
-- $1 business, ($2, $3) keyset cursor, $4 limit.
select ls.last_event_id as as_of_event_id, t.sort_at, t.id, t.item
  from dashboard.listener_state ls
  left join lateral (
      select x.created_at as sort_at, x.id,
             jsonb_build_object(
                 'id', x.id, 'client_id', x.client_id, 'client_name', c.name, 'payment_id', x.payment_id,
                 'type', x.type, 'amount_minor', x.amount_minor, 'currency', x.currency,
                 'created_at', x.created_at, 'updated_at', x.updated_at
             )::text as item
        from client_business_transactions x left join clients c on c.id = x.client_id
       where x.business_id = $1 and (x.created_at, x.id) < ($2::timestamptz, $3::uuid)
       order by x.created_at desc, x.id desc
       limit $4
  ) as t on true
 order by t.sort_at desc, t.id desc

-- bookings --
-- $1 business, ($2, $3) keyset cursor, $4 limit.
select ls.last_event_id as as_of_event_id, t.sort_at, t.id, t.item
  from dashboard.listener_state ls
  left join lateral (
      select x.created_at as sort_at, x.id,
             jsonb_build_object(
                 'id', x.id, 'client_id', x.client_id, 'client_name', c.name,
                 'amount_due_minor', x.amount_due_minor, 'currency', x.currency, 'status', x.status,
                 'payment_status', x.payment_status, 'starts_at', x.starts_at, 'created_at', x.created_at,
                 'updated_at', x.updated_at
             )::text as item
        from bookings x left join clients c on c.id = x.client_id
       where x.business_id = $1 and (x.created_at, x.id) < ($2::timestamptz, $3::uuid)
       order by x.created_at desc, x.id desc
       limit $4
  ) as t on true
 order by t.sort_at desc, t.id desc

-- business_exists --
select exists (select 1 from businesses where id = $1)

-- rebuild_sizes --
-- Every business, in id order, with the rows a rebuild of it reads (payments and bookings): what
-- `aggregates rebuild` cuts into chunks. One pass over each table, whatever the number of businesses.
select b.id, coalesce(p.n, 0) + coalesce(k.n, 0) as rows
  from businesses b
  left join (select business_id, count(*) as n from payments group by 1) as p on p.business_id = b.id
  left join (select business_id, count(*) as n from bookings group by 1) as k on k.business_id = b.id
 order by b.id

-- rebuild_sizes_of --
-- The same for these businesses only (unknown ids too, with no rows), through the business indexes.
select i as id,
       (select count(*) from payments p where p.business_id = i)
       + (select count(*) from bookings k where k.business_id = i) as rows
  from unnest($1::uuid[]) as i
 order by i

-- rebuild --
-- Recompute these businesses (one chunk) from the base tables; the rows it had to repair, per business and
-- rollup (none when all was exact). Index-driven, so a chunk costs its own rows whatever was built before.
select business_id, rollup, rows_repaired from dashboard.rebuild_aggregates_v4($1::uuid[])

-- append_refresh_events --
-- $1 business ids (text). One `invalidate` per business, its payload built as the listener builds its own.
select dashboard.append_refresh_events_v1($1::text[])
