-- metric_aggregates.stale_after without rewriting unchanged aggregates as time passes.
--
-- Before: every due aggregate whose sources had not changed got a new stale_after, one UPDATE per
-- row (a day after a first rollup: ~570k rows rewritten, index entries included, for nothing but
-- the clock). Now the stored rows keep the stale_after their computation gave them
-- (computed_stale_after = computed_at + the cadence band's refresh_every, 'infinity' when final),
-- and metric_aggregates is a view over them that shows the same column with the same meaning:
-- the instant after which the aggregate is due again. Once that instant has passed, a rollup
-- that found the sources unchanged moves it to the next tick of the window's band after the
-- rollup's as_of: the next multiple of refresh_every since 2000-01-01 00:00 UTC (quarter hours,
-- whole hours, midnights UTC), so never more than refresh_every after that rollup. The rollup
-- records, in rollup_clock, its as_of and for each band the oldest window_end it holds and its
-- next tick: one row per run instead of one write per aggregate. A window is final (stale_after
-- 'infinity') once a tick of the last band passed when it was older than the last band's
-- max_age; recomputed (sources advanced) aggregates are written as before.

ALTER TABLE metric_aggregates RENAME TO metric_aggregate_rows;
ALTER TABLE metric_aggregate_rows RENAME COLUMN stale_after TO computed_stale_after;
-- The visible stale_after is computed, so an index on the stored one selects nothing useful.
DROP INDEX IF EXISTS idx_aggregates_stale;

CREATE TABLE IF NOT EXISTS rollup_clock (
  one        boolean PRIMARY KEY DEFAULT true CHECK (one),
  as_of      timestamptz NOT NULL,
  -- ascending window_end thresholds: band_from[1] is the final boundary, then the slowest band's
  -- youngest-excluded boundary ... the youngest band's; band_next[i] is the next tick of the
  -- band that holds window_end in [band_from[i], band_from[i+1]).
  band_from  timestamptz[] NOT NULL,
  band_next  timestamptz[] NOT NULL,
  run_id     uuid NOT NULL
);
ALTER TABLE rollup_clock ENABLE ROW LEVEL SECURITY;
ALTER TABLE rollup_clock FORCE ROW LEVEL SECURITY;
REVOKE ALL ON rollup_clock FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_clock TO service_role;
GRANT SELECT ON rollup_clock TO authenticated;
DROP POLICY IF EXISTS service_role_all ON rollup_clock;
CREATE POLICY service_role_all ON rollup_clock FOR ALL TO service_role
  USING (true) WITH CHECK (true);
-- The clock holds no tenant data: every tenant reads it to see its aggregates' stale_after (the
-- policy's name is the one derive_settle_grants keeps authenticated's SELECT for).
DROP POLICY IF EXISTS tenant_isolation ON rollup_clock;
CREATE POLICY tenant_isolation ON rollup_clock FOR SELECT TO authenticated USING (true);

-- security_invoker: the caller's privileges and the row-level policies of metric_aggregate_rows
-- apply, as they did on the table. One FROM entry and no joins: the view stays auto-updatable
-- (DELETE and UPDATE of stored columns go through; stale_after itself is read-only).
CREATE OR REPLACE VIEW metric_aggregates WITH (security_invoker = true) AS
SELECT a.id, a.user_id, a.org_id, a.metric_kind, a.window_start, a.window_end, a.value_numeric,
       a.currency, a.surfaces_included, a.surface_breakdown, a.computed_at,
       CASE WHEN a.computed_stale_after
                 > coalesce((SELECT k.as_of FROM rollup_clock k), '-infinity'::timestamptz)
            THEN a.computed_stale_after
            ELSE coalesce((SELECT k.band_next FROM rollup_clock k)
                            [width_bucket(a.window_end, (SELECT k.band_from FROM rollup_clock k))],
                          'infinity'::timestamptz)
       END AS stale_after,
       a.created_at
  FROM metric_aggregate_rows a;

REVOKE ALL ON metric_aggregates FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON metric_aggregates TO service_role;
GRANT SELECT ON metric_aggregates TO authenticated;
-- What default privileges (Supabase) hand out on new objects and the job never needs.
REVOKE TRUNCATE, REFERENCES, TRIGGER ON metric_aggregates, rollup_clock FROM service_role;

-- The cascades of migration 0010, on the stored rows.
CREATE OR REPLACE FUNCTION public.derive_cascade_users() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    DELETE FROM public.attribution_credits;
    DELETE FROM public.metric_aggregate_rows;
  ELSE
    DELETE FROM public.attribution_credits a USING gone g WHERE a.user_id = g.id;
    DELETE FROM public.metric_aggregate_rows a USING gone g WHERE a.user_id = g.id;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION public.derive_cascade_orgs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    DELETE FROM public.attribution_credits WHERE org_id IS NOT NULL;
    DELETE FROM public.metric_aggregate_rows WHERE org_id IS NOT NULL;
  ELSE
    DELETE FROM public.attribution_credits a USING gone g WHERE a.org_id = g.id;
    DELETE FROM public.metric_aggregate_rows a USING gone g WHERE a.org_id = g.id;
  END IF;
  RETURN NULL;
END
$$;
