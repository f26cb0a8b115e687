-- Precomputed figures per business, kept exact by the listener: for every business a batch of changes
-- touches, `dashboard.rebuild_aggregates_v1` recomputes that business's rows from the base tables, in the same
-- transaction that appends its events. One business's rows come from its own index range (about a millisecond
-- for thousands of payments), so a payment never costs a whole-view refresh. Definitions: DESIGN.md,
-- "Figure definitions".

-- Completed revenue per local day (the business's timezone) and currency.
create table dashboard.revenue_daily (
    business_id    uuid not null,
    day            date not null,
    currency       text not null,
    revenue_minor  bigint not null,
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

create function dashboard.rebuild_aggregates_v1(ids uuid[]) returns void
language sql as $$
    delete from dashboard.revenue_daily where business_id = any(ids);
    insert into dashboard.revenue_daily (business_id, day, currency, revenue_minor, payments_count)
    select p.business_id, (coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date, p.currency,
           sum(p.amount_minor), count(*)
      from payments p join businesses b on b.id = p.business_id
     where p.business_id = any(ids) and p.status = 'completed'
     group by 1, 2, 3;

    delete from dashboard.business_clients where business_id = any(ids);
    insert into dashboard.business_clients (business_id, client_id, first_paid_day)
    select p.business_id, p.client_id, min((coalesce(p.paid_at, p.created_at) at time zone b.timezone)::date)
      from payments p join businesses b on b.id = p.business_id
     where p.business_id = any(ids) and p.status = 'completed' and p.client_id is not null
     group by 1, 2;

    delete from dashboard.booking_counts where business_id = any(ids);
    insert into dashboard.booking_counts (business_id, status, payment_status, bookings)
    select business_id, status, payment_status, count(*)
      from bookings where business_id = any(ids)
     group by 1, 2, 3;
$$;
