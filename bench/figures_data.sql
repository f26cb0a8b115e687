-- A payment history for the figures benchmarks: 1M payments over 10k businesses, loaded straight into a scratch database
-- that already has the schema (bench/figures.py creates it, applies the schema and drops it afterwards).
--
-- The distribution is skewed on purpose: business #1 holds 10% of all payments (a chain with 100k payments),
-- the other 9,999 share the rest (about 90 each). Two years of history, 85% completed, mixed currencies,
-- 10% of payments without a client, a few timezones (one with DST).
--
-- Capture triggers are bypassed for the load (session_replication_role = replica): the benchmark is about
-- reading and rebuilding figures, not about capturing a bulk load.
--
-- `psql -v payments=N` loads N payments instead (bookings scale with it, 3 per 10 payments; business #1 keeps
-- its 10%); bench/e2e_latency.py uses that for quick runs.

\if :{?payments}
\else
  \set payments 1000000
\endif

set session_replication_role = replica;

create temporary table bench_biz as
select n, gen_random_uuid() as id,
       (array['Africa/Nairobi', 'Africa/Nairobi', 'Africa/Lagos', 'Europe/London'])[1 + n % 4] as tz
  from generate_series(1, 10000) as n;
create unique index on bench_biz (n);

insert into businesses (id, name, timezone) select id, 'Business ' || n, tz from bench_biz;

create temporary table bench_client as
select n, gen_random_uuid() as id from generate_series(1, 200000) as n;
create unique index on bench_client (n);
insert into clients (id, name, phone) select id, 'Client ' || n, '+2547' || lpad(n::text, 8, '0') from bench_client;

insert into bookings (business_id, client_id, amount_due_minor, currency, status, payment_status, created_at)
select b.id, c.id, 100 * (1 + g % 500), 'KES',
       (array['pending', 'confirmed', 'completed', 'cancelled', 'no_show'])[1 + g % 5],
       (array['unpaid', 'pending', 'partially_paid', 'paid', 'refunded'])[1 + (g / 5) % 5],
       now() - (g % 730) * interval '1 day'
  from generate_series(1, :payments * 3 / 10) as g
  join bench_biz b on b.n = case when g <= :payments * 3 / 100 then 1 else 2 + g % 9999 end
  join bench_client c on c.n = 1 + (g::bigint * 7919) % 200000;

insert into payments (business_id, client_id, amount_minor, currency, method, status, provider, provider_reference,
                      paid_at, created_at)
select b.id,
       case when g % 10 = 0 then null else c.id end,
       100 * (1 + (g::bigint * 31) % 5000),
       case when g % 10 = 3 then 'USD' else 'KES' end,
       (array['mpesa', 'paystack', 'card', 'cash', 'bank_transfer', 'other'])[1 + g % 6],
       case when g % 100 < 85 then 'completed' when g % 100 < 92 then 'pending'
            when g % 100 < 97 then 'failed' else 'refunded' end,
       'bench', 'ref-' || g,
       case when g % 100 < 85 then ts + interval '2 minutes' end,
       ts
  from generate_series(1, :payments) as g
  cross join lateral (select now() - ((g::bigint * 7) % 730) * interval '1 day' - (g % 86400) * interval '1 second') as t(ts)
  join bench_biz b on b.n = case when g <= :payments / 10 then 1 else 2 + g % 9999 end
  join bench_client c on c.n = 1 + (g::bigint * 104729) % 200000;

insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency, status, created_at)
select business_id, id, 'bench', amount_minor, currency, status, created_at
  from payments where provider_reference like 'ref-%' and (hashtext(id::text) % 5) = 0;

insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor, currency,
                                          created_at)
select business_id, client_id, id, 'payment', amount_minor, currency, created_at
  from payments where status = 'completed' and client_id is not null and (hashtext(id::text) % 5) = 1;

reset session_replication_role;
analyze;
