-- Payment ingestion (src/cdc_dashboard/ingest/recording.py). asyncpg placeholders ($1, ...).
-- Every webhook runs these inside one transaction; locks are taken in one order everywhere
-- (payment key, then client key, then booking row) so concurrent webhooks never deadlock each other.

-- lock_key --
-- Serialises everything done about one payment key (a reference, a receipt, an email) until commit.
-- $2: the seed of these keys, LockKey.INGEST_PAYMENT_KEY (src/cdc_dashboard/db/locks.py).
select pg_advisory_xact_lock(hashtextextended($1::text, $2::bigint))

-- business_exists --
select exists (select 1 from businesses where id = $1::uuid)

-- business_by_subaccount --
select id from businesses where paystack_subaccount = $1::text

-- business_by_shortcode --
select id from businesses where mpesa_shortcode = $1::text

-- client_by_email --
select id from clients where lower(email) = lower($1::text) order by created_at, id limit 1

-- client_by_phone --
-- A full number only (ingest/wire.py is_full_phone_number): it names one person, whichever business they pay.
select id from clients where phone = $1::text order by created_at, id limit 1

-- client_by_masked_phone --
-- A masked or hashed MSISDN is shared by thousands of people, so it never names another business's client:
-- only a client who already paid this business ($1), with the same masked number and the same name.
select c.id from clients c
where c.phone = $2::text and c.name = $3::text
  and exists (select 1 from payments p where p.client_id = c.id and p.business_id = $1::uuid)
order by c.created_at, c.id
limit 1

-- insert_client --
insert into clients (name, phone, email) values ($1::text, $2::text, $3::text) returning id

-- lock_booking --
select id from bookings where id = $1::uuid and business_id = $2::uuid for update

-- payment_by_reference --
select id, business_id, client_id, booking_id, amount_minor, refunded_minor, currency, status, mpesa_receipt,
       paid_at
from payments where provider = $1::text and provider_reference = $2::text
for update

-- payment_by_receipt --
select id, business_id, client_id, booking_id, amount_minor, refunded_minor, currency, status, mpesa_receipt,
       paid_at
from payments where mpesa_receipt = $1::text
for update

-- insert_payment --
-- The conflict target is the provider's own key; an empty result means another writer got there first.
insert into payments (business_id, client_id, booking_id, amount_minor, currency, method, status, provider,
                      provider_reference, mpesa_receipt, paid_at)
values ($1::uuid, $2::uuid, $3::uuid, $4::bigint, $5::text, $6::text, 'completed', $7::text, $8::text, $9::text,
        coalesce($10::timestamptz, now()))
on conflict (provider, provider_reference) do nothing
returning id

-- complete_payment --
-- A payment the app created as pending (STK push started, Paystack checkout opened) is now paid.
update payments
set status = 'completed', amount_minor = $2::bigint, currency = $3::text, paid_at = coalesce($4::timestamptz, now()),
    client_id = $5::uuid, booking_id = $6::uuid, mpesa_receipt = coalesce($7::text, mpesa_receipt)
where id = $1::uuid

-- fail_payment --
update payments set status = 'failed' where id = $1::uuid

-- refund_payment --
-- Nets one refund's applied amount ($2, at most what is left: recording.py works it out from the locked row)
-- out of the payment; `refunded` once nothing is left. A partial refund leaves it `completed`, counted for
-- amount_minor - refunded_minor.
update payments
set refunded_minor = refunded_minor + $2::bigint,
    status = case when refunded_minor + $2::bigint >= amount_minor then 'refunded' else status end
where id = $1::uuid

-- move_payment_transactions --
-- The same M-Pesa payment reached us first by C2B, then by STK: the app's payment takes over the C2B
-- payment's history before the C2B row goes.
update payment_transactions set payment_id = $1::uuid where payment_id = $2::uuid

-- move_ledger --
update client_business_transactions
set payment_id = $1::uuid, client_id = coalesce($3::uuid, client_id)
where payment_id = $2::uuid

-- delete_payment --
delete from payments where id = $1::uuid

-- insert_payment_transaction --
-- provider_reference ($8) is set for events that are not the payment itself (a refund: 'refund:' || its
-- refund_reference); unique per provider, so a redelivered refund inserts nothing and returns no row.
insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency, status, raw,
                                  provider_reference)
values ($1::uuid, $2::uuid, $3::text, $4::bigint, $5::text, $6::text, $7::text::jsonb, $8::text)
on conflict (provider, provider_reference) where provider_reference is not null do nothing
returning id

-- insert_ledger --
insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor, currency)
values ($1::uuid, $2::uuid, $3::uuid, $4::text, $5::bigint, $6::text)

-- lock_booking_row --
-- Taken in its own statement before the recomputation below, so that statement's snapshot is taken after
-- any other payment of this booking committed: two payments completing at once would otherwise each
-- count only themselves.
select 1 from bookings where id = $1::uuid for update

-- refresh_booking_payment_status --
-- paid when the booking's completed payments (in its currency), net of their partial refunds, cover what is
-- due, partially_paid below, refunded when nothing completed is left but something was refunded; otherwise
-- unchanged. Written only when it changes, so a duplicate webhook causes no booking event.
update bookings b
set payment_status = s.next
from (
    select bk.id,
           case
               when p.completed > 0 and p.completed >= bk.amount_due_minor then 'paid'
               when p.completed > 0 then 'partially_paid'
               when p.refunded > 0 then 'refunded'
               else bk.payment_status
           end as next
    from bookings bk,
         lateral (
             select coalesce(sum(amount_minor - refunded_minor) filter (where status = 'completed'), 0) as completed,
                    count(*) filter (where status = 'refunded') as refunded
             from payments
             where booking_id = bk.id and currency = bk.currency
         ) p
    where bk.id = $1::uuid
) s
where b.id = s.id and b.payment_status <> s.next
