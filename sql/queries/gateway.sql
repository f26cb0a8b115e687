-- Queries of the SSE gateway (`cdc_dashboard.gateway`). Events are read by id: ids are committed in id order
-- (every appender takes the events lock before drawing ids), so "id > position" never skips a late commit.

-- hub_position --
-- Where a starting gateway begins: the newest event, even when pruning emptied the table.
select greatest(s.last_event_id, coalesce((select max(e.id) from dashboard.events e), 0)) as position
from dashboard.listener_state s

-- hub_catch_up --
-- The next events after the hub's position, for every business; $2 bounds one batch.
select id, business_id, kind, payload::text as payload, created_at
from dashboard.events
where id > $1
order by id
limit $2

-- stream_replay --
-- One page of a business's retained events after $1 (events without a business concern everyone), with the
-- retention horizon read in the same snapshot: a page that starts after `pruned_through` has no gap.
select s.pruned_through, s.last_event_id, e.id, e.kind, e.payload::text as payload
from dashboard.listener_state s
left join lateral (
    select id, kind, payload
    from dashboard.events
    where id > $1 and (business_id = $2 or business_id is null)
    order by id
    limit $3
) e on true
order by e.id

-- listener_state --
-- The listener's bookkeeping row, for /v1/status.
select state, node, last_event_id, last_change_id, last_change_at, pruned_through, reconnects, last_error,
       last_error_at, heartbeat_at, started_at, now() - heartbeat_at as heartbeat_age
from dashboard.listener_state

-- ping --
select 1

-- schema_present --
-- `serve` refuses to start on a database without the events log (forgot `db apply`).
select to_regclass('dashboard.events') is not null and to_regprocedure('dashboard.append_events_v1(text[],text[],jsonb[])') is not null

-- listener_lag --
-- For /metrics: the changes captured but not yet turned into events (the change log is a queue), the age of
-- the oldest of them, the listener's heartbeat age, and the changes it set aside (dashboard.dead_letters: a
-- small table, each row waiting for an operator's retry or discard).
-- Every scrape runs this, also while the listener catches up a backlog of millions of changes: so no count(*)
-- and no min() over the change log. The backlog is counted exactly up to 10000, and above that estimated from
-- the ids at both ends of the queue (their primary key index: two lookups); gaps (rolled-back captures) make
-- the estimate an upper bound. The oldest change is the one with the smallest id (ids and captured_at are
-- both taken as a change is captured).
with head as (select id, captured_at from cdc.change_log order by id limit 1),
     counted as (select count(*) as n from (select 1 from cdc.change_log order by id limit 10000) first_ones)
select (case when counted.n < 10000 then counted.n
             else greatest(counted.n, (select max(id) from cdc.change_log) - (select id from head) + 1)
        end)::bigint as backlog,
       coalesce(extract(epoch from now() - (select captured_at from head)), 0)::float8 as lag_seconds,
       extract(epoch from now() - s.heartbeat_at)::float8 as heartbeat_age_seconds,
       (select count(*) from dashboard.dead_letters)::bigint as dead_letters
from dashboard.listener_state s, counted

-- dead_letters_summary --
-- For /v1/status: how many changes the listener set aside, and since when.
select count(*)::bigint as count, min(created_at) as oldest_at from dashboard.dead_letters

-- dead_letters_recent --
-- For /v1/status: the newest $1 of them, newest first (`cdc-dashboard dead-letters list` shows them all).
select id, change ->> 'table' as "table", change ->> 'op' as op, change ->> 'business_id' as business_id,
       change ->> 'row_id' as row_id, reason, sqlstate, created_at
from dashboard.dead_letters
order by id desc
limit $1

-- hub_recent --
-- The newest $2 events up to the hub's starting position $1, newest first, kept in memory for resuming streams.
select id, business_id, kind, payload::text as payload, created_at
from dashboard.events
where id <= $1
order by id desc
limit $2
