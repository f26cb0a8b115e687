-- The per-batch maintenance functions run small, fixed-shape statements (index probes by primary key) with
-- different arrays each time. PostgreSQL re-plans such statements on every call by default (custom plans, the
-- array's contents being visible), and planning was most of their cost: measured on the 1M-payment benchmark
-- data, one payment change through apply_changes_v2 took 1.25 ms (p50) with custom plans and 0.39 ms with the
-- cached generic plan. The generic plan is the same probe-by-key plan whatever the array holds.
-- The full rebuild keeps custom plans: its statements scan whole businesses, where the estimates matter.

alter function dashboard.sync_payments_v2(uuid[]) set plan_cache_mode = force_generic_plan;
alter function dashboard.sync_bookings_v2(uuid[]) set plan_cache_mode = force_generic_plan;
alter function dashboard.apply_changes_v2(text[], text[]) set plan_cache_mode = force_generic_plan;
