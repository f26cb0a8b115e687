-- Queries that load the demo data of `cdc-dashboard run`.

-- existing --
select count(*) > 0 from businesses where id = any(%s::uuid[])

-- business --
insert into businesses (id, name, timezone, mpesa_shortcode) values (%s, %s, %s, %s)

-- client --
insert into clients (id, name, phone, email) values (%s, %s, %s, %s)

-- booking --
insert into bookings (id, business_id, client_id, amount_due_minor, currency, status, payment_status, created_at)
values (%s, %s, %s, %s, %s, %s, %s, %s)

-- payment --
insert into payments (id, business_id, client_id, booking_id, amount_minor, currency, method, status, provider,
                      provider_reference, paid_at, created_at, refunded_minor)
values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)

-- payment_transaction --
insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency, status, created_at)
values (%s, %s, %s, %s, %s, %s, %s)

-- ledger --
insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor, currency,
                                          created_at)
values (%s, %s, %s, %s, %s, %s, %s)

-- rebuild --
select count(*) from dashboard.rebuild_aggregates_v3(%s::uuid[])
