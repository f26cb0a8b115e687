-- Events: the listener's output, read by every gateway, and the listener's own state (docs/ARCHITECTURE.md,
-- "Events: ordered, durable, one writer at a time"). Schema `dashboard` holds the product's own objects; the
-- capture in schema `cdc` (sql/triggers) can be uninstalled and reinstalled by a DBA without touching them.

create schema if not exists dashboard;

-- Invalidation events, appended only by the active listener (or a manual refresh), each in a transaction
-- that holds the events lock (4242000002): ids are therefore handed out and committed in the same order, and a
-- reader that sees event N has seen every event before it. Payloads are JSON text in DESIGN's key order
-- (`json`: PostgreSQL only checks that each parses, and gateways send the stored text unchanged). Events are
-- pruned oldest id first, so no index on created_at.
create sequence dashboard.event_id_seq;
create table dashboard.events (
    id           bigint primary key,
    business_id  text,                 -- null: concerns every business (a TRUNCATE: resync)
    kind         text not null check (kind in ('invalidate', 'resync')),
    payload      json not null,
    created_at   timestamptz not null default now()
);
create index events_business_idx on dashboard.events (business_id, id);

-- One row: what the listener has done. It doubles as its heartbeat for doctor and /v1/status.
create table dashboard.listener_state (
    singleton          boolean primary key default true check (singleton),
    state              text not null default 'stopped'
                       check (state in ('stopped', 'connecting', 'catching_up', 'live', 'standby')),
    node               text,           -- host:pid of the active listener
    last_event_id      bigint not null default 0,
    last_change_id     bigint not null default 0,
    last_change_at     timestamptz,    -- capture time of the newest change consumed
    pruned_through     bigint not null default 0,  -- events with id <= this may have been pruned
    reconnects         bigint not null default 0,
    last_error         text,
    last_error_at      timestamptz,
    heartbeat_at       timestamptz,
    started_at         timestamptz
);
insert into dashboard.listener_state (singleton) values (true);

-- Appends events in one call and wakes the gateways once. Callers run it inside the transaction that also
-- changed the figures, so events and figures never disagree. The transaction-level lock serialises appenders:
-- ids are committed in the order they are handed out. (jsonb payloads: stored with jsonb's key order.)
create function dashboard.append_events_v1(business_ids text[], kinds text[], payloads jsonb[])
returns bigint[]
language plpgsql as $$
declare
    ids bigint[];
begin
    perform pg_advisory_xact_lock(4242000002);
    with input as (
        select b, k, p, ord from unnest(business_ids, kinds, payloads) with ordinality as u(b, k, p, ord)
    ), inserted as (
        insert into dashboard.events (id, business_id, kind, payload)
        select nextval('dashboard.event_id_seq'), b, k, p from (select * from input order by ord) as ordered
        returning id
    )
    select coalesce(array_agg(id order by id), '{}') into ids from inserted;
    if cardinality(ids) > 0 then
        update dashboard.listener_state set last_event_id = ids[cardinality(ids)];
        perform pg_notify('dashboard_events_v1', ids[cardinality(ids)]::text);
    end if;
    return ids;
end $$;

-- A manual refresh's events: one `invalidate` per business, naming every query key, with no changes listed. The
-- payload is put together as the listener's batch puts its own (consume_changes_body_v2): the listener's
-- query-key template for the payment tables and bookings, the same keys in the same order, the same formats;
-- `reason` last. Appended under the events lock, in the caller's transaction (which rebuilt the figures).
create function dashboard.append_refresh_events_v1(business_ids text[]) returns bigint[]
language plpgsql as $$
declare
    template text := dashboard.query_keys_template_v1('{public.payments,public.bookings}');
    ids      bigint[];
begin
    perform pg_advisory_xact_lock(4242000002);
    with inserted as (
        insert into dashboard.events (id, business_id, kind, payload)
        select nextval('dashboard.event_id_seq'), b, 'invalidate',
               ('{"business_id":' || to_json(b)::text
                || ',"query_keys":' || replace(template, chr(1), to_json(b)::text)
                || ',"changes":[],"change_count":0,"payments":[],"committed_at":"'
                || to_char(now() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')
                || '","reason":"manual_refresh"}')::json
          from (select b from unnest(business_ids) with ordinality as u(b, ord) order by ord) as ordered
        returning id
    )
    select coalesce(array_agg(id order by id), '{}') into ids from inserted;
    if cardinality(ids) > 0 then
        update dashboard.listener_state set last_event_id = ids[cardinality(ids)];
        perform pg_notify('dashboard_events_v1', ids[cardinality(ids)]::text);
    end if;
    return ids;
end $$;
