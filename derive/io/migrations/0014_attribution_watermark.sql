-- The attribution job's watermark: whether anything its previous run read has changed.
--
-- Every touchpoint carries the id of the transaction that inserted it (xid8), and updates,
-- deletes and truncations of prospect_touchpoints are recorded per statement in
-- prospect_touchpoint_changes (a prospect deleted sets its touchpoints' prospect_id to null: an
-- update; a user or org deleted cascades to its touchpoints: a delete). A run records its read
-- snapshot; the next run with the same options finds whether any row is not visible in it. If
-- none is, and no conversion entered [since, as_of] by time, the stored credits are what a
-- recomputation would write, and the run reads nothing (see derive.jobs.attribution). Rows that
-- existed before this migration have no xid and count as seen; no run before it recorded a
-- snapshot, so the first run after it is a full one.
ALTER TABLE prospect_touchpoints ADD COLUMN IF NOT EXISTS xid xid8;
ALTER TABLE prospect_touchpoints ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS idx_touchpoints_xid ON prospect_touchpoints (xid);
-- Conversions entering the window by time: an index range.
CREATE INDEX IF NOT EXISTS idx_touchpoints_conversion_time ON prospect_touchpoints (occurred_at)
  WHERE prospect_id IS NOT NULL
    AND touchpoint IN ('subscription_new', 'tip', 'booking_confirmed', 'booking_completed');

CREATE TABLE IF NOT EXISTS prospect_touchpoint_changes (
  xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
  operation  text NOT NULL,
  changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS idx_touchpoint_changes_xid ON prospect_touchpoint_changes (xid);
ALTER TABLE prospect_touchpoint_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE prospect_touchpoint_changes FORCE ROW LEVEL SECURITY;
REVOKE ALL ON prospect_touchpoint_changes FROM PUBLIC, anon, authenticated;
GRANT SELECT ON prospect_touchpoint_changes TO service_role;
DROP POLICY IF EXISTS service_role_all ON prospect_touchpoint_changes;
CREATE POLICY service_role_all ON prospect_touchpoint_changes FOR SELECT TO service_role
  USING (true);

CREATE OR REPLACE FUNCTION public.derive_record_touchpoint_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    INSERT INTO public.prospect_touchpoint_changes (operation) VALUES (tg_op);
  ELSIF EXISTS (SELECT 1 FROM derive_touched) THEN
    INSERT INTO public.prospect_touchpoint_changes (operation) VALUES (tg_op);
  END IF;
  RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION public.derive_record_touchpoint_changes() FROM PUBLIC;

DROP TRIGGER IF EXISTS derive_touchpoint_changes_upd ON prospect_touchpoints;
CREATE TRIGGER derive_touchpoint_changes_upd AFTER UPDATE ON prospect_touchpoints
  REFERENCING OLD TABLE AS derive_touched FOR EACH STATEMENT
  EXECUTE FUNCTION public.derive_record_touchpoint_changes();
DROP TRIGGER IF EXISTS derive_touchpoint_changes_del ON prospect_touchpoints;
CREATE TRIGGER derive_touchpoint_changes_del AFTER DELETE ON prospect_touchpoints
  REFERENCING OLD TABLE AS derive_touched FOR EACH STATEMENT
  EXECUTE FUNCTION public.derive_record_touchpoint_changes();
DROP TRIGGER IF EXISTS derive_touchpoint_changes_trunc ON prospect_touchpoints;
CREATE TRIGGER derive_touchpoint_changes_trunc AFTER TRUNCATE ON prospect_touchpoints
  FOR EACH STATEMENT EXECUTE FUNCTION public.derive_record_touchpoint_changes();
-- Emptying attribution_credits (derive never does) is a change too: the next run recomputes.
DROP TRIGGER IF EXISTS derive_credit_changes_trunc ON attribution_credits;
CREATE TRIGGER derive_credit_changes_trunc AFTER TRUNCATE ON attribution_credits
  FOR EACH STATEMENT EXECUTE FUNCTION public.derive_record_touchpoint_changes();

-- Each run's per-surface totals: what a run that finds nothing changed reports again.
CREATE TABLE IF NOT EXISTS attribution_run_surfaces (
  run_id           uuid NOT NULL,
  model            text NOT NULL,
  surface          text NOT NULL,
  currency         text,
  conversions      bigint NOT NULL,
  credits          bigint NOT NULL,
  attributed_value numeric NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_attribution_run_surfaces_run ON attribution_run_surfaces (run_id);
ALTER TABLE attribution_run_surfaces ENABLE ROW LEVEL SECURITY;
ALTER TABLE attribution_run_surfaces FORCE ROW LEVEL SECURITY;
REVOKE ALL ON attribution_run_surfaces FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, DELETE ON attribution_run_surfaces TO service_role;
DROP POLICY IF EXISTS service_role_all ON attribution_run_surfaces;
CREATE POLICY service_role_all ON attribution_run_surfaces FOR ALL TO service_role
  USING (true) WITH CHECK (true);

-- derive_settle_rollup_grants (0013) over these tables too.
CREATE OR REPLACE FUNCTION derive_settle_rollup_grants() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_schema regnamespace := (SELECT p.pronamespace::regnamespace FROM pg_proc p
                             WHERE p.oid = 'derive_settle_rollup_grants()'::regprocedure);
  v_extra text := CASE WHEN current_setting('server_version_num')::int >= 170000
                       THEN ', MAINTAIN' ELSE '' END;
  v_table text;
  v_grantee regrole;
BEGIN
  FOR v_table IN
    SELECT c.relname FROM pg_class c
     WHERE c.relnamespace = v_schema AND c.relkind IN ('r', 'v')
       AND c.relname IN ('metric_aggregate_rows', 'rollup_clock', 'metric_aggregates',
                         'prospect_touchpoint_changes', 'attribution_run_surfaces')
  LOOP
    EXECUTE format('REVOKE TRUNCATE, REFERENCES, TRIGGER%s ON %I FROM PUBLIC, anon, authenticated,'
                   ' service_role', v_extra, v_table);
    EXECUTE format('REVOKE SELECT, UPDATE, DELETE ON %I FROM anon', v_table);
    EXECUTE format('REVOKE UPDATE, DELETE ON %I FROM authenticated', v_table);
    IF v_table IN ('prospect_touchpoint_changes', 'attribution_run_surfaces') THEN
      EXECUTE format('REVOKE SELECT ON %I FROM authenticated', v_table);
    END IF;
    FOR v_grantee IN
      SELECT a.grantee::regrole FROM pg_class c, aclexplode(c.relacl) a
       WHERE c.relnamespace = v_schema AND c.relname = v_table
         AND a.privilege_type = 'INSERT'
         AND a.grantee IN ('anon'::regrole, 'authenticated'::regrole)
    LOOP
      EXECUTE format('REVOKE INSERT ON %I FROM %I', v_table, v_grantee::text);
    END LOOP;
  END LOOP;
END
$$;

DO $$
BEGIN
  EXECUTE format('ALTER FUNCTION derive_settle_rollup_grants() SET search_path = pg_catalog, %I,'
                 ' pg_temp', current_schema());
END
$$;
REVOKE ALL ON FUNCTION derive_settle_rollup_grants() FROM PUBLIC, anon, authenticated, service_role;

SELECT derive_settle_rollup_grants();
