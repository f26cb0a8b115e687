-- Queries of the listener daemon (EnhancedRealtimeManager).

-- try_leadership --
-- Held for the life of the leader's dedicated connection; a standby retries it every second.
-- $1: LockKey.LISTENER_LEADERSHIP (src/cdc_dashboard/db/locks.py).
select pg_try_advisory_lock($1::bigint)

-- schema_ready --
-- The objects this version of the listener calls (`db apply` creates them).
select to_regprocedure('dashboard.consume_changes_v2(integer,text,bigint)') is not null
   and to_regclass('cdc.sleeping_until_v1') is not null

-- end_sessions --
select count(pg_terminate_backend(pid)) from pg_stat_activity
 where pid = any($1::int[]) and application_name like 'cdc-dashboard listener%'

-- consume_batch --
-- The whole batch in one statement, and so one transaction in autocommit (the listener batch in sql/schema/);
-- a change that cannot be processed is set aside in dashboard.dead_letters.
select consumed, last_change_id, events_appended, last_event_id, dead_letters
  from dashboard.consume_changes_v2($1, $2, $3)

-- record_state --
update dashboard.listener_state
   set state = $1, node = $2, heartbeat_at = now(),
       started_at = case when $1 = 'catching_up' and started_at is null then now() else started_at end

-- record_error --
update dashboard.listener_state
   set last_error = $1, last_error_at = now(), reconnects = reconnects + 1

-- heartbeat --
update dashboard.listener_state set heartbeat_at = now(), state = $1

-- announce_sleep --
-- Writers NOTIFY only while this is in the future (cdc.wake_v1); renewed at every probe. Not transactional:
-- every writer sees it at once.
select setval('cdc.sleeping_until_v1', ceil(extract(epoch from now()))::bigint + $1::bigint)

-- announce_awake --
select setval('cdc.sleeping_until_v1', 0)

-- writers_settled --
-- True when no open transaction can have read the old sleep announcement: a transaction that wrote to the
-- change log holds RowExclusiveLock on it until it ends (fast-path locks included in pg_locks). Never waits.
select not exists (
    select 1 from pg_locks
     where locktype = 'relation' and relation = 'cdc.change_log'::regclass
       and database = (select oid from pg_database where datname = current_database())
       and mode = 'RowExclusiveLock' and pid <> pg_backend_pid()
)

-- prune_events --
-- Oldest ids first: ids follow commit order, and so (to within a transaction's length) do creation times.
with doomed as (
    select id from (select id, created_at from dashboard.events order by id limit $2) as oldest
     where created_at < now() - make_interval(secs => $1)
), deleted as (
    delete from dashboard.events e using doomed where e.id = doomed.id returning e.id
), mark as (
    update dashboard.listener_state set pruned_through = greatest(pruned_through, (select max(id) from deleted))
     where exists (select 1 from deleted)
)
select count(*) from deleted
