-- What building one event payload costs, by method (docs/BENCHMARKS.md, "2026-11-27, third session").
--
--     psql -q -f bench/payload_building.sql postgresql://postgres@127.0.0.1:5432/postgres
--
-- 100,000 payloads of the shape a one-payment event has (business id, the seven query keys, one change, no
-- toast, committed_at), built four ways; each statement's time (\timing) divided by 100,000 is the cost of
-- one payload. Only temporary tables are created. Summing the lengths of the payloads as text forces every one
-- to be built; for jsonb that includes turning it back into text, as every gateway did on every read.

\timing on
create temp table bench_payload_rows as
select gen_random_uuid()::text as business_id, gen_random_uuid()::text as row_id, 'payments'::text as tbl,
       'INSERT'::text as op, clock_timestamp() as at
  from generate_series(1, 100000);
create temp table bench_payload_keys as
select '[["dashboard-stats",' || chr(1) || '],["business-revenue",' || chr(1) || '],["business-data",' || chr(1)
       || '],["transactions",' || chr(1) || '],["client-business-transactions",' || chr(1)
       || '],["payment-transactions",' || chr(1) || '],["payments",' || chr(1) || ']]' as template;

\echo jsonb_build_object (54870f0, as stored before 0008):
select sum(length(p::text)) from (
    select jsonb_build_object('business_id', business_id,
                              'query_keys', replace(template, chr(1), to_json(business_id)::text)::jsonb,
                              'changes', jsonb_build_array(jsonb_build_object('table', tbl, 'op', op, 'id', row_id)),
                              'change_count', 1, 'payments', '[]'::jsonb,
                              'committed_at', to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')) as p
      from bench_payload_rows, bench_payload_keys) as built;

\echo json_build_object:
select sum(length(p::text)) from (
    select json_build_object('business_id', business_id,
                             'query_keys', replace(template, chr(1), to_json(business_id)::text)::json,
                             'changes', json_build_array(json_build_object('table', tbl, 'op', op, 'id', row_id)),
                             'change_count', 1, 'payments', '[]'::json,
                             'committed_at', to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')) as p
      from bench_payload_rows, bench_payload_keys) as built;

\echo text, as 0008 builds it:
select sum(length(p)) from (
    select '{"business_id":' || to_json(business_id)::text
           || ',"query_keys":' || replace(template, chr(1), to_json(business_id)::text)
           || ',"changes":[{"table":' || to_json(tbl)::text || ',"op":"' || op || '","id":' || to_json(row_id)::text
           || '}],"change_count":1,"payments":[],"committed_at":"'
           || to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') || '"}' as p
      from bench_payload_rows, bench_payload_keys) as built;

\echo text, then validated as json (what 0008 stores):
select sum(length(p::text)) from (
    select ('{"business_id":' || to_json(business_id)::text
            || ',"query_keys":' || replace(template, chr(1), to_json(business_id)::text)
            || ',"changes":[{"table":' || to_json(tbl)::text || ',"op":"' || op || '","id":' || to_json(row_id)::text
            || '}],"change_count":1,"payments":[],"committed_at":"'
            || to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') || '"}')::json as p
      from bench_payload_rows, bench_payload_keys) as built;
