-- Queries of the listener daemon (EnhancedRealtimeManager).

-- try_leadership --
-- Held for the life of the leader's dedicated connection; a standby retries it every second.
select pg_try_advisory_lock(4242000004)

-- end_sessions --
select count(pg_terminate_backend(pid)) from pg_stat_activity
 where pid = any($1::int[]) and application_name like 'cdc-dashboard listener%'

-- consume_changes --
-- The change log is a queue: consuming deletes, in the same transaction that appends the events. A writer
-- that commits late still has its rows here; nothing can be skipped by a cursor moving past it.
with batch as (
    select id from cdc.change_log order by id limit $1 for update skip locked
)
delete from cdc.change_log c using batch where c.id = batch.id
returning c.id, c.table_name, c.op, c.business_id, c.row_id, c.old_values, c.new_values, c.captured_at

-- toast_payments --
select p.id::text, p.amount_minor, p.currency, p.method, c.name as client_name, p.status
  from payments p left join clients c on c.id = p.client_id
 where p.id = any($1::uuid[]) and p.status = 'completed'

-- apply_changes --
select dashboard.apply_changes_v2($1::text[], $2::text[])

-- rebuild_all_aggregates --
select count(*) from dashboard.rebuild_aggregates_v2(array(select id from businesses))

-- append_events --
select dashboard.append_events_v1($1::text[], $2::text[], $3::jsonb[])

-- dead_letter --
insert into dashboard.dead_letters (change, reason) values ($1::jsonb, $2)

-- record_progress --
update dashboard.listener_state
   set last_change_id = greatest(last_change_id, $1), last_change_at = $2, heartbeat_at = now(), state = $3

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
-- Writers NOTIFY only while this is in the future (cdc.wake_v1); renewed at every probe.
update cdc.wake_state set sleeping_until = now() + make_interval(secs => $1)

-- announce_awake --
update cdc.wake_state set sleeping_until = null

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
with doomed as (
    select id from dashboard.events
     where created_at < now() - make_interval(secs => $1)
     order by id limit $2
), deleted as (
    delete from dashboard.events e using doomed where e.id = doomed.id returning e.id
), mark as (
    update dashboard.listener_state set pruned_through = greatest(pruned_through, (select max(id) from deleted))
     where exists (select 1 from deleted)
)
select count(*) from deleted
