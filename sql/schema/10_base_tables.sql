-- The business tables: what the dashboard reads and the capture triggers watch (DESIGN.md, "Reference schema").
-- Money is bigint minor units plus an ISO 4217 code; ids are UUIDs with gen_random_uuid() defaults. An
-- application that adopts the product keeps its own tables instead and maps them (docs/ADOPTING.md).
--
-- This file and the others of sql/schema/ are what a new database gets (`db apply`, in file-name order, in one
-- transaction); sql/schema/migrations/ brings an existing database to the same catalog, which
-- tests/integration/test_schema_catalog.py checks.

create table businesses (
    id                  uuid primary key default gen_random_uuid(),
    name                text not null check (length(name) between 1 and 200),
    timezone            text not null default 'Africa/Nairobi'
                        check (now() at time zone timezone is not null),
    mpesa_shortcode     text unique,
    paystack_subaccount text unique,
    created_at          timestamptz not null default now(),
    updated_at          timestamptz not null default now()
);

create table clients (
    id         uuid primary key default gen_random_uuid(),
    name       text not null default '' check (length(name) <= 200),
    phone      text,
    email      text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index clients_email_idx on clients (lower(email)) where email is not null;
create index clients_phone_idx on clients (phone) where phone is not null;

create table bookings (
    id               uuid primary key default gen_random_uuid(),
    business_id      uuid not null references businesses (id) on delete cascade,
    client_id        uuid references clients (id) on delete set null,
    amount_due_minor bigint not null default 0 check (amount_due_minor >= 0),
    currency         text not null default 'KES' check (currency ~ '^[A-Z]{3}$'),
    status           text not null default 'pending'
                     check (status in ('pending', 'confirmed', 'completed', 'cancelled', 'no_show')),
    payment_status   text not null default 'unpaid'
                     check (payment_status in ('unpaid', 'pending', 'partially_paid', 'paid', 'refunded')),
    starts_at        timestamptz,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);
create index bookings_business_idx on bookings (business_id, created_at desc);

-- An M-Pesa payment can reach us twice, as an STK push result and as a C2B confirmation, under two provider
-- references (CheckoutRequestID, TransID); the receipt number (MpesaReceiptNumber = TransID) is the one key both
-- carry, so it is unique on its own. refunded_minor is what has been refunded of the payment so far: revenue
-- counts amount_minor - refunded_minor of every completed payment.
create table payments (
    id                 uuid primary key default gen_random_uuid(),
    business_id        uuid not null references businesses (id) on delete cascade,
    client_id          uuid references clients (id) on delete set null,
    booking_id         uuid references bookings (id) on delete set null,
    amount_minor       bigint not null check (amount_minor >= 0),
    currency           text not null check (currency ~ '^[A-Z]{3}$'),
    method             text not null
                       check (method in ('mpesa', 'paystack', 'card', 'cash', 'bank_transfer', 'other')),
    status             text not null default 'pending'
                       check (status in ('pending', 'completed', 'failed', 'refunded')),
    provider           text,
    provider_reference text,
    paid_at            timestamptz,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    mpesa_receipt      text check (length(mpesa_receipt) between 1 and 64),
    refunded_minor     bigint not null default 0,
    unique (provider, provider_reference),
    constraint payments_refunded_minor_check check (refunded_minor >= 0 and refunded_minor <= amount_minor)
);
-- Amounts are bounded far above any real payment and far below what the sums could overflow. NOT VALID: a
-- database upgraded from before the bound may hold a larger amount, and every new or updated row is checked.
alter table payments add constraint payments_amount_minor_bound check (amount_minor <= 1000000000000) not valid;
-- The dashboard's hot path: one business's payments by time (figures, series, recent transactions).
create index payments_business_time_idx on payments (business_id, (coalesce(paid_at, created_at)) desc, id desc);
create index payments_business_created_idx on payments (business_id, created_at desc, id desc);
create index payments_client_idx on payments (client_id) where client_id is not null;
create index payments_booking_idx on payments (booking_id) where booking_id is not null;
create unique index payments_mpesa_receipt_key on payments (mpesa_receipt) where mpesa_receipt is not null;

-- provider_reference: the provider's own reference (e.g. a Paystack refund), so a webhook counts once.
create table payment_transactions (
    id           uuid primary key default gen_random_uuid(),
    business_id  uuid references businesses (id) on delete cascade,  -- null: unattributed webhook
    payment_id   uuid references payments (id) on delete set null,
    provider     text not null check (length(provider) between 1 and 50),
    amount_minor bigint not null check (amount_minor >= 0),
    currency     text not null check (currency ~ '^[A-Z]{3}$'),
    status       text not null default 'pending'
                 check (status in ('pending', 'completed', 'failed', 'refunded')),
    raw          jsonb,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    provider_reference text
);
create index payment_transactions_business_idx on payment_transactions (business_id, created_at desc, id desc);
create index payment_transactions_payment_idx on payment_transactions (payment_id);
create unique index payment_transactions_provider_reference_key
    on payment_transactions (provider, provider_reference) where provider_reference is not null;

create table client_business_transactions (
    id           uuid primary key default gen_random_uuid(),
    business_id  uuid not null references businesses (id) on delete cascade,
    client_id    uuid references clients (id) on delete set null,
    payment_id   uuid references payments (id) on delete set null,
    type         text not null check (type in ('payment', 'refund')),
    amount_minor bigint not null check (amount_minor >= 0),
    currency     text not null check (currency ~ '^[A-Z]{3}$'),
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);
create index client_business_transactions_business_idx
    on client_business_transactions (business_id, created_at desc, id desc);

-- updated_at follows every update, whoever writes.
create function touch_updated_at_v1() returns trigger language plpgsql as $$
begin
    new.updated_at := now();
    return new;
end $$;

create trigger touch_updated_at_v1 before update on businesses
    for each row execute function touch_updated_at_v1();
create trigger touch_updated_at_v1 before update on clients
    for each row execute function touch_updated_at_v1();
create trigger touch_updated_at_v1 before update on bookings
    for each row execute function touch_updated_at_v1();
create trigger touch_updated_at_v1 before update on payments
    for each row execute function touch_updated_at_v1();
create trigger touch_updated_at_v1 before update on payment_transactions
    for each row execute function touch_updated_at_v1();
create trigger touch_updated_at_v1 before update on client_business_transactions
    for each row execute function touch_updated_at_v1();
