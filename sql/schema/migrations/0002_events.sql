-- The listener's output and bookkeeping, in schema `dashboard` (the capture in schema `cdc` can be
-- uninstalled and reinstalled by a DBA without touching these).

create schema if not exists dashboard;

-- Invalidation events, appended only by the active listener (or a manual refresh), each in a transaction
-- that holds the events lock: ids are therefore handed out and committed in the same order, and a reader that
-- sees event N has seen every event before it.
create sequence dashboard.event_id_seq;
create table dashboard.events (
    id           bigint primary key,
    business_id  text,                 -- null: concerns every business (a TRUNCATE: resync)
    kind         text not null check (kind in ('invalidate', 'resync')),
    payload      jsonb not null,
    created_at   timestamptz not null default now()
);
create index events_business_idx on dashboard.events (business_id, id);
create index events_created_idx on dashboard.events (created_at);

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

-- Changes the listener could not turn into an event: kept with the reason, never retried silently.
create table dashboard.dead_letters (
    id          bigint generated always as identity primary key,
    change      jsonb not null,
    reason      text not null,
    created_at  timestamptz not null default now()
);

-- Appends events in one call and wakes the gateways once. Callers run it inside the transaction that also
-- consumed the changes and updated the aggregates, so events, figures and the change log never disagree.
-- The transaction-level lock serialises appenders (the listener, a manual refresh, a standby taking over):
-- ids are then committed in the order they are handed out.
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
