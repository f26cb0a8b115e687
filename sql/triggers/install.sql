-- cdc-dashboard capture, version 1.
--
-- Installs a durable change log and a generic capture trigger that any table with a business key column can
-- use. Apply with plain `psql -f install.sql` (idempotent: safe to run again); remove with uninstall.sql.
--
--   select cdc.track('public.payments', business_column => 'business_id', watch_columns => array['status']);
--   (id_column => 'id' names the row key; watch_columns are copied, old and new, into each change)
--   select cdc.untrack('public.payments');
--
-- Every object carries a _v1 suffix: a later version installs _v2 beside it, so a running listener never
-- finds its functions changed under it.
--
-- How a change travels: the trigger appends a small row to cdc.change_log in the writer's own transaction
-- (durable, and invisible until that transaction commits). The listener consumes the log as a queue, so a
-- transaction that commits late is still consumed - no cursor can skip it. NOTIFY is only a wake-up hint,
-- and writers send it only while the listener says it is asleep: a busy system never pays NOTIFY's
-- commit-time lock per transaction.

create schema if not exists cdc;

create table if not exists cdc.change_log (
    id           bigint generated always as identity primary key,
    table_name   text not null,                 -- schema.table
    op           text not null check (op in ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    business_id  text,                          -- the row's business key as text; null only for TRUNCATE
    row_id       text,                          -- the row's key as text, never the whole row
    old_values   jsonb,                         -- the watched columns before (UPDATE, DELETE)
    new_values   jsonb,                         -- the watched columns after (INSERT, UPDATE)
    captured_at  timestamptz not null default clock_timestamp()
);

create table if not exists cdc.tracked_tables (
    table_name      text primary key,           -- schema.table
    business_column text not null,
    id_column       text not null,
    watch_columns   text[] not null default '{}',
    tracked_at      timestamptz not null default now()
);

-- The listener's sleep announcement: the Unix time (seconds) until which it sleeps; 0 (or never set) when it is
-- awake. Writers NOTIFY only while that time is in the future; the listener renews it while it waits, so a
-- crashed listener stops costing writers within a minute. A sequence rather than a table row, for two reasons:
-- writers read it with a plain function call, where a query on a table row would cost every writing
-- transaction a large share of what the whole capture costs it; and setval is visible at once to every
-- transaction, a REPEATABLE READ writer whose snapshot predates it included.
create sequence if not exists cdc.sleeping_until_v1 minvalue 0 start 0;

-- The table-row announcement that cdc.sleeping_until_v1 replaced: nothing reads it any more.
drop table if exists cdc.wake_state;

-- Wake the listener if it sleeps (NOTIFY is only delivered at commit, and a transaction's identical NOTIFYs
-- are delivered once).
--
-- The race where a writer reads "awake" just before the listener announces sleep is closed on the listener's
-- side, at no cost to writers: every transaction that wrote to cdc.change_log holds RowExclusiveLock on it
-- until it ends, and the listener sleeps untimed only once pg_locks shows no such transaction but its own.
-- (Not a shared advisory lock taken by every writer: all of them would contend for one lock-table entry.)
create or replace function cdc.wake_v1() returns void
language plpgsql as $$
begin
    if to_timestamp(pg_sequence_last_value('cdc.sleeping_until_v1')) > now() then
        perform pg_notify('cdc_wake_v1', '');
    end if;
end $$;

-- Row-level capture is generated per tracked table by cdc.track (cdc.capture_<hash>_v1): it reads the
-- business key, the row key and the watched columns straight from NEW/OLD, so a write pays for a few field
-- reads and one small insert - never for turning the whole row into JSON.
create or replace function cdc.capture_function_name_v1(table_ref text) returns text
language sql immutable as $$
    select 'capture_' || left(md5(table_ref), 16) || '_v1'
$$;

create or replace function cdc.capture_function_source_v1(
    table_ref text, business_column text, id_column text, watch_columns text[]
) returns text
language plpgsql immutable as $$
declare
    new_watch text := 'null';
    old_watch text := 'null';
begin
    if cardinality(watch_columns) > 0 then
        select 'jsonb_build_object(' || string_agg(format('%L, new.%I', c, c), ', ') || ')',
               'jsonb_build_object(' || string_agg(format('%L, old.%I', c, c), ', ') || ')'
          into new_watch, old_watch
          from unnest(watch_columns) as c;
    end if;
    return format($src$
create or replace function cdc.%1$I() returns trigger
language plpgsql as $body$
begin
    -- A row with no business belongs to no dashboard (e.g. an unattributed webhook kept for audit).
    if tg_op = 'INSERT' then
        if new.%3$I is not null then
            insert into cdc.change_log (table_name, op, business_id, row_id, new_values)
            values (%2$L, 'INSERT', new.%3$I::text, new.%4$I::text, %5$s);
        end if;
    elsif tg_op = 'UPDATE' then
        if new.%3$I is not null then
            insert into cdc.change_log (table_name, op, business_id, row_id, old_values, new_values)
            values (%2$L, 'UPDATE', new.%3$I::text, new.%4$I::text, %6$s, %5$s);
        end if;
        -- An update that moves a row to another business informs the business it left too.
        if old.%3$I is not null and old.%3$I is distinct from new.%3$I then
            insert into cdc.change_log (table_name, op, business_id, row_id, old_values)
            values (%2$L, 'UPDATE', old.%3$I::text, old.%4$I::text, %6$s);
        end if;
    elsif old.%3$I is not null then
        insert into cdc.change_log (table_name, op, business_id, row_id, old_values)
        values (%2$L, 'DELETE', old.%3$I::text, old.%4$I::text, %6$s);
    end if;
    -- cdc.wake_v1, inlined: a function call per write is measurable on the write path.
    if to_timestamp(pg_sequence_last_value('cdc.sleeping_until_v1')) > now() then
        perform pg_notify('cdc_wake_v1', '');
    end if;
    return null;
end $body$
$src$, cdc.capture_function_name_v1(table_ref), table_ref, business_column, id_column, new_watch, old_watch);
end $$;

-- TRUNCATE removes rows without row images: record one change with no business; the listener turns it into
-- a resync for every dashboard.
create or replace function cdc.capture_truncate_v1() returns trigger
language plpgsql as $$
begin
    insert into cdc.change_log (table_name, op) values (tg_table_schema || '.' || tg_table_name, 'TRUNCATE');
    perform cdc.wake_v1();
    return null;
end $$;

create or replace function cdc.track(
    target regclass,
    business_column text default 'business_id',
    id_column text default 'id',
    watch_columns text[] default '{}'
) returns void
language plpgsql as $$
declare
    table_ref text;
    missing   text;
begin
    select n.nspname || '.' || c.relname into table_ref
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
    select col into missing
      from unnest(array[business_column, id_column] || watch_columns) as col
     where not exists (select 1 from pg_attribute a
                        where a.attrelid = target and a.attname = col and a.attnum > 0 and not a.attisdropped)
     limit 1;
    if missing is not null then
        raise exception 'cdc.track: table % has no column "%"', table_ref, missing
            using errcode = 'undefined_column',
                  hint = 'name the column that holds the business key with business_column => ''...''';
    end if;
    execute cdc.capture_function_source_v1(table_ref, business_column, id_column, watch_columns);
    execute format('drop trigger if exists cdc_capture_v1 on %s', target);
    execute format('drop trigger if exists cdc_capture_truncate_v1 on %s', target);
    execute format('create trigger cdc_capture_v1 after insert or update or delete on %s for each row '
                   'execute function cdc.%I()', target, cdc.capture_function_name_v1(table_ref));
    execute format('create trigger cdc_capture_truncate_v1 after truncate on %s for each statement '
                   'execute function cdc.capture_truncate_v1()', target);
    insert into cdc.tracked_tables (table_name, business_column, id_column, watch_columns)
    values (table_ref, business_column, id_column, watch_columns)
    on conflict (table_name) do update
       set business_column = excluded.business_column, id_column = excluded.id_column,
           watch_columns = excluded.watch_columns, tracked_at = now();
end $$;

create or replace function cdc.untrack(target regclass) returns void
language plpgsql as $$
declare
    table_ref text;
begin
    select n.nspname || '.' || c.relname into table_ref
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = target;
    execute format('drop trigger if exists cdc_capture_v1 on %s', target);
    execute format('drop trigger if exists cdc_capture_truncate_v1 on %s', target);
    execute format('drop function if exists cdc.%I()', cdc.capture_function_name_v1(table_ref));
    delete from cdc.tracked_tables where table_name = table_ref;
end $$;

-- Tables tracked by an earlier version of this file get the current capture functions.
select cdc.track(table_name::regclass, business_column, id_column, watch_columns)
  from cdc.tracked_tables
 where to_regclass(table_name) is not null;
