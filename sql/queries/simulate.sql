-- `cdc-dashboard simulate`: what it reads to pick businesses and clients, and what it writes acting as the
-- businesses' own app (bookings, pending STK pushes). Payments themselves go through the webhooks or
-- cdc_dashboard.ingest, like real traffic. asyncpg placeholders.

-- businesses --
select b.id, b.mpesa_shortcode,
       coalesce((select p.currency from payments p where p.business_id = b.id
                 group by p.currency order by count(*) desc limit 1), 'KES') as currency
from businesses b
-- Never pay doctor's probe business ($2: cdc_dashboard.ops.probe.PROBE_BUSINESS_ID), present while a probe runs.
where b.id <> $2::uuid
order by b.created_at, b.id
limit $1::int

-- create_business --
insert into businesses (name, mpesa_shortcode) values ($1::text, $2::text)
on conflict (mpesa_shortcode) do nothing
returning id

-- returning_clients --
-- Clients who already paid this business: the ones who come back.
select distinct c.email, c.phone, c.name
from clients c join payments p on p.client_id = c.id
where p.business_id = $1::uuid
limit 200

-- create_booking --
insert into bookings (business_id, amount_due_minor, currency, status, payment_status)
values ($1::uuid, $2::bigint, $3::text, 'confirmed', 'pending')
returning id

-- start_stk_push --
-- What the app stores when it asks Safaricom for an STK push: a pending payment keyed by CheckoutRequestID.
insert into payments (business_id, booking_id, amount_minor, currency, method, status, provider, provider_reference)
values ($1::uuid, $2::uuid, $3::bigint, 'KES', 'mpesa', 'pending', 'mpesa', $4::text)
returning id
