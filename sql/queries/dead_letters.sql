-- Queries of `cdc-dashboard dead-letters` (psycopg, %(name)s parameters): the changes the listener set aside in
-- dashboard.dead_letters, and putting them back in the pipeline. `change` is the cdc.change_log row as the
-- listener took it: {"id", "table", "op", "business_id", "row_id", "old", "new", "captured_at"}.

-- list --
-- Oldest first (ids follow the order the listener set them aside).
select id, created_at, extract(epoch from now() - created_at)::float8 as age_seconds,
       change ->> 'table' as table_name, change ->> 'op' as op, change ->> 'business_id' as business_id,
       change ->> 'row_id' as row_id, reason, sqlstate, change
  from dashboard.dead_letters
 order by id

-- lock --
-- The dead letters a retry or a discard acts on (all of them with %(all)s), locked until the command's
-- transaction ends: two operators acting on the same id take turns, and the second finds it gone. `problem` is
-- the listener's own reason to set the change aside at once (dashboard.change_problem_v1): a retry refuses such
-- a change rather than have it come straight back under a new id.
select id, created_at, change ->> 'table' as table_name, change ->> 'op' as op,
       change ->> 'business_id' as business_id, change ->> 'row_id' as row_id, reason, sqlstate, change,
       dashboard.change_problem_v1(change ->> 'op', change ->> 'table', change ->> 'business_id') as problem
  from dashboard.dead_letters
 where %(all)s or id = any(%(ids)s::bigint[])
 order by id
   for update

-- retry --
-- Back into the change log as new changes, in the order they were set aside, and out of dead_letters, in one
-- statement of the caller's transaction. Each gets a fresh change id (drawn here, so the answer pairs every
-- dead letter with its change exactly) and captured_at = now: the change enters the queue now, and the
-- backlog's age (doctor, /metrics) measures time in the queue, not how long the change was set aside.
with doomed as (
    delete from dashboard.dead_letters where id = any(%(ids)s::bigint[]) returning id, change
), numbered as (
    select d.id as dead_letter_id, d.change, nextval(pg_get_serial_sequence('cdc.change_log', 'id')) as change_id
      from (select id, change from doomed order by id) as d
), retried as (
    insert into cdc.change_log (id, table_name, op, business_id, row_id, old_values, new_values)
    overriding system value
    select change_id, change ->> 'table', change ->> 'op', change ->> 'business_id', change ->> 'row_id',
           nullif(change -> 'old', 'null'::jsonb), nullif(change -> 'new', 'null'::jsonb)
      from numbered
    returning id
)
select n.dead_letter_id, n.change_id, (select count(*) from retried)::int as inserted
  from numbered n
 order by n.dead_letter_id

-- wake --
-- What a capture trigger does after writing a change: NOTIFY the listener if it announced sleep (delivered at
-- commit). The listener only sleeps once no transaction holding a write lock on cdc.change_log is open, so
-- this transaction is covered as any writer's is; and it polls besides.
select cdc.wake_v1()

-- discard --
delete from dashboard.dead_letters where id = any(%(ids)s::bigint[]) returning id
