-- Removes cdc-dashboard capture (version 1): the triggers from every tracked table, then the cdc functions.
-- Apply with `psql -f uninstall.sql`; idempotent. The change log in schema cdc is
-- dropped too (anything the listener had not consumed yet is gone with them); the product's own tables (schema
-- dashboard: events, aggregates) stay.

do $$
declare
    t record;
begin
    if to_regclass('cdc.tracked_tables') is not null then
        for t in select table_name from cdc.tracked_tables loop
            if to_regclass(t.table_name) is not null then
                execute format('drop trigger if exists cdc_capture_v1 on %s', t.table_name);
                execute format('drop trigger if exists cdc_capture_truncate_v1 on %s', t.table_name);
            end if;
        end loop;
    end if;
end $$;

drop schema if exists cdc cascade;
