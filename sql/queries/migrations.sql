-- Queries of the migration runner (`cdc-dashboard db apply` / `db status`).

-- create_migrations_table --
create schema if not exists dashboard;
create table if not exists dashboard.schema_migrations (
    version    text primary key,      -- the file name, e.g. 0001_base.sql or triggers/install.sql
    checksum   text not null,         -- sha256 of the file as applied
    applied_at timestamptz not null default now()
)

-- lock --
select pg_advisory_lock(%s)

-- unlock --
select pg_advisory_unlock(%s)

-- migrations_table_exists --
select to_regclass('dashboard.schema_migrations') is not null

-- applied --
select version, checksum, applied_at from dashboard.schema_migrations order by version

-- record --
insert into dashboard.schema_migrations (version, checksum) values (%s, %s)
on conflict (version) do update set checksum = excluded.checksum, applied_at = now()

-- capture_installed --
select to_regprocedure('cdc.capture_function_source_v1(text, text, text, text[])') is not null
   and to_regprocedure('cdc.wake_v1()') is not null
   and to_regclass('cdc.change_log') is not null

-- is_tracked --
select exists (select 1 from cdc.tracked_tables where table_name = %s)
   and exists (select 1 from pg_trigger where tgname = 'cdc_capture_v1' and tgrelid = %s::regclass)

-- track --
select cdc.track(%s, business_column => %s, id_column => 'id', watch_columns => %s::text[])
