-- Queries of `cdc-dashboard doctor` (asyncpg, $n parameters). Read-only, except the end-to-end probe, which
-- writes and cleans up after itself (docs/OPERATIONS.md, "The end-to-end probe").

-- server --
select current_setting('server_version') as version, current_database() as database

-- capture_objects --
-- What sql/triggers/install.sql creates in schema cdc; each tracked table's own function is checked with
-- its trigger (capture_triggers).
select o.name, case o.kind when 'function' then to_regprocedure(o.name) is not null
                          else to_regclass(o.name) is not null end as present
  from (values ('cdc.wake_v1()', 'function'),
               ('cdc.capture_truncate_v1()', 'function'),
               ('cdc.capture_function_name_v1(text)', 'function'),
               ('cdc.capture_function_source_v1(text,text,text,text[])', 'function'),
               ('cdc.track(regclass,text,text,text[])', 'function'),
               ('cdc.untrack(regclass)', 'function'),
               ('cdc.change_log', 'table'),
               ('cdc.tracked_tables', 'table'),
               ('cdc.sleeping_until_v1', 'sequence')) as o(name, kind)
 order by o.name

-- capture_recorded_checksum --
-- The checksum of the install.sql `db apply` ran last (null: never, or a DBA installed it with psql).
select checksum from dashboard.schema_migrations where version = 'triggers/install.sql'

-- tracked_tables --
select table_name, business_column, id_column, watch_columns from cdc.tracked_tables order by table_name

-- capture_triggers --
-- For each table (schema.table as cdc.tracked_tables spells it): does it exist, and how are its two capture
-- triggers set. tgenabled: O = enabled, A = always, R = replica only (silent in normal sessions), D = disabled.
-- The row trigger must call the table's generated function, named by install.sql's cdc.capture_function_name_v1.
select t.name as table_name,
       t.expected_function,
       c.oid is not null as table_exists,
       (select tg.tgenabled::text from pg_trigger tg
         where tg.tgrelid = c.oid and tg.tgname = 'cdc_capture_v1') as row_trigger,
       (select p.proname::text from pg_trigger tg join pg_proc p on p.oid = tg.tgfoid
         where tg.tgrelid = c.oid and tg.tgname = 'cdc_capture_v1') as row_function,
       (select tg.tgenabled::text from pg_trigger tg
         where tg.tgrelid = c.oid and tg.tgname = 'cdc_capture_truncate_v1') as truncate_trigger,
       exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                where n.nspname = 'cdc' and p.proname = t.expected_function) as function_exists
  from (select name, cdc.capture_function_name_v1(name) as expected_function from unnest($1::text[]) as name) as t
  left join pg_namespace n on n.nspname = split_part(t.name, '.', 1)
  left join pg_class c on c.relnamespace = n.oid and c.relname = substr(t.name, length(split_part(t.name, '.', 1)) + 2)
 order by t.name

-- notify_queue --
select pg_notification_queue_usage()::float8 as usage

-- listener_state --
select state, node, last_event_id, last_change_id, last_change_at, reconnects, last_error, last_error_at,
       heartbeat_at, started_at, extract(epoch from now() - heartbeat_at)::float8 as heartbeat_age_seconds,
       -- The active listener holds this session lock (listener.sql, try_leadership); standbys wait for it.
       -- $1: LockKey.LISTENER_LEADERSHIP (src/cdc_dashboard/db/locks.py), a key below 2^32 (classid 0).
       exists (select 1 from pg_locks
                where locktype = 'advisory' and classid = 0 and objid = $1::bigint::oid and objsubid = 1
                  and granted and database = (select oid from pg_database where datname = current_database()))
           as leader_connected,
       -- The active one and its hot standbys.
       (select count(*) from pg_stat_activity
         where datname = current_database()
           and application_name = 'cdc-dashboard listener (leader lock)')::int as listener_processes
  from dashboard.listener_state

-- backlog --
-- The change log is a queue: what is in it has not been turned into events yet (committed rows only).
select count(*)::bigint as backlog,
       extract(epoch from now() - min(captured_at))::float8 as oldest_seconds
  from cdc.change_log

-- oldest_transaction --
-- The oldest transaction that wrote something or sits idle inside a transaction: its changes reach the
-- dashboards only when it commits, and it keeps vacuum from reclaiming the consumed change log.
select pid, extract(epoch from now() - xact_start)::float8 as age_seconds, state, application_name,
       left(query, 200) as query
  from pg_stat_activity
 where datname = current_database() and xact_start is not null and pid <> pg_backend_pid()
   and (backend_xid is not null or state like 'idle in transaction%')
 order by xact_start
 limit 1

-- events --
-- Retention: the oldest and newest events by id (the primary key; creation times follow ids), never a scan.
with oldest as (select created_at from dashboard.events order by id limit 1),
     newest as (select id, created_at from dashboard.events order by id desc limit 1)
select (select created_at from oldest) as oldest_at,
       (select created_at from newest) as newest_at,
       extract(epoch from now() - (select created_at from oldest))::float8 as oldest_age_seconds,
       (select id from newest) as newest_id,
       s.pruned_through, s.last_event_id
  from dashboard.listener_state s

-- dead_letters --
-- How many changes wait in dashboard.dead_letters, and the oldest of them (ids follow the order they were set
-- aside). The table is small: each row is a change an operator still has to retry or discard.
with oldest as (
    select id, created_at, change ->> 'table' as table_name, change ->> 'op' as op, reason
      from dashboard.dead_letters order by id limit 1
)
select (select count(*) from dashboard.dead_letters)::bigint as count,
       o.id as oldest_id, o.created_at as oldest_at,
       extract(epoch from now() - o.created_at)::float8 as oldest_age_seconds,
       o.table_name as oldest_table, o.op as oldest_op, o.reason as oldest_reason,
       (select max(created_at) from dashboard.dead_letters) as newest_at
  from (select 1) as one
  left join oldest o on true

-- probe_lock --
-- One probe at a time per database (two doctors run at once take turns). Session-level: doctor connects
-- directly, never through a transaction-pooling PgBouncer.
-- $1: LockKey.DOCTOR_PROBE (src/cdc_dashboard/db/locks.py).
select pg_try_advisory_lock($1::bigint)

-- probe_unlock --
select pg_advisory_unlock($1::bigint)

-- probe_cleanup --
-- Whatever an earlier, interrupted probe left: its events, and the business row (cascades to any row a
-- writer attached to it by mistake). Runs before and after each probe, under the probe lock.
with events as (
    delete from dashboard.events where business_id = $1::text returning 1
), business as (
    delete from businesses where id = $1::uuid returning 1
)
select (select count(*) from events)::int as events, (select count(*) from business)::int as businesses

-- probe_business --
-- The probe's own business: a well-known id, present only while a probe runs.
insert into businesses (id, name) values ($1::uuid, 'cdc-dashboard doctor probe') on conflict (id) do nothing

-- probe_position --
-- Ids are drawn in order: every change the probe captures has a larger id than this.
select coalesce(max(id), 0)::bigint from cdc.change_log

-- probe_insert --
-- A failed provider attempt of amount 0: no figure counts payment_transactions, and the row is deleted in the
-- same transaction, so it never exists for anyone else. The capture trigger still records both changes.
insert into payment_transactions (id, business_id, provider, amount_minor, currency, status, raw)
values ($1::uuid, $2::uuid, 'cdc-dashboard-doctor', 0, 'XXX', 'failed', '{"probe": true}')

-- probe_delete --
delete from payment_transactions where id = $1::uuid

-- probe_captured --
-- Inside the writing transaction: the capture trigger's rows are visible to it before commit.
select count(*)::int from cdc.change_log where id > $1 and row_id = $2::text

-- probe_event --
select id from dashboard.events
 where business_id = $1::text and payload::jsonb -> 'changes' @> jsonb_build_array(jsonb_build_object('id', $2::text))
 order by id limit 1

-- probe_pending --
-- The probe's changes still in the log: not consumed yet.
select count(*)::int from cdc.change_log where id > $1 and business_id = $2::text

-- probe_withdraw --
-- A probe that timed out takes its changes back (unless a listener is consuming them right now).
delete from cdc.change_log
 where id in (select id from cdc.change_log where id > $1 and business_id = $2::text for update skip locked)
