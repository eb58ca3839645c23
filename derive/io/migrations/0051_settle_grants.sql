-- Grants that default privileges hand out behind derive's back (SPEC §1, §2.12).
--
-- On Supabase the admin roles carry default privileges (pg_default_acl) that grant ALL on every new
-- table, sequence and function in public to anon, authenticated and service_role. derive's table
-- migrations revoke from the client roles, but not everything: derive_migrations, the sequences and
-- the definer functions (derive_start_run, derive_heartbeat ...) kept those grants, and
-- service_role got TRUNCATE (which RLS does not govern), TRIGGER and REFERENCES on derived tables.
--
-- derive_settle_grants() takes back every privilege of that kind on derive's own objects; `derive
-- db migrate` calls it after every migration run, so objects of later migrations are settled too.
-- What it keeps is what the table migrations grant on purpose: SELECT for authenticated where a
-- tenant_isolation policy decides which rows it sees, the column INSERT on audience_events, and
-- service_role's SELECT/INSERT/UPDATE/DELETE. It never widens a grant, so it is safe to repeat.

CREATE OR REPLACE FUNCTION derive_settle_grants() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  -- Its own schema: current_schema() would name pg_catalog, first on the pinned search_path.
  v_schema regnamespace := (SELECT p.pronamespace::regnamespace FROM pg_proc p
                             WHERE p.oid = 'derive_settle_grants()'::regprocedure);
  v_extra text := CASE WHEN current_setting('server_version_num')::int >= 170000
                       THEN ', MAINTAIN' ELSE '' END;
  v_table text;
  v_seq text;
  v_fn regprocedure;
  v_grantee regrole;
BEGIN
  FOR v_table IN
    SELECT c.relname FROM pg_class c
     WHERE c.relnamespace = v_schema AND c.relkind IN ('r', 'p')
       AND (c.relname LIKE 'derive\_%' OR c.relname = ANY (ARRAY[
             'audience_events', 'audience_state', 'derivation_runs', 'users', 'orgs', 'prospects',
             'surface_metrics', 'metric_aggregates', 'prospect_touchpoints', 'attribution_credits',
             'ingestion_sessions', 'ingestion_session_steps', 'audience_state_history',
             'audience_state_history_steps', 'rollup_pending', 'audience_event_changes']))
  LOOP
    -- Never meant for anyone but the owner: TRUNCATE skips RLS and the row guards of DELETE.
    EXECUTE format('REVOKE TRUNCATE, REFERENCES, TRIGGER%s ON %I FROM PUBLIC, anon, authenticated,'
                   ' service_role', v_extra, v_table);
    EXECUTE format('REVOKE SELECT, UPDATE, DELETE ON %I FROM anon', v_table);
    EXECUTE format('REVOKE UPDATE, DELETE ON %I FROM authenticated', v_table);
    -- Table-level INSERT only (a REVOKE would also drop audience_events' column grants).
    FOR v_grantee IN
      SELECT a.grantee::regrole FROM pg_class c, aclexplode(c.relacl) a
       WHERE c.relnamespace = v_schema AND c.relname = v_table
         AND a.privilege_type = 'INSERT'
         AND a.grantee IN ('anon'::regrole, 'authenticated'::regrole)
    LOOP
      EXECUTE format('REVOKE INSERT ON %I FROM %I', v_table, v_grantee::text);
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_policies p
                    WHERE p.schemaname = v_schema::text AND p.tablename = v_table
                      AND p.policyname = 'tenant_isolation') THEN
      EXECUTE format('REVOKE SELECT ON %I FROM authenticated', v_table);
    END IF;
  END LOOP;

  FOR v_seq IN
    SELECT s.relname FROM pg_class s
      JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
                      AND d.refclassid = 'pg_class'::regclass
      JOIN pg_class t ON t.oid = d.refobjid
     WHERE s.relkind = 'S' AND s.relnamespace = v_schema
       AND (t.relname LIKE 'derive\_%' OR t.relname LIKE 'audience\_%' OR t.relname IN
            ('derivation_runs', 'surface_metrics', 'metric_aggregates', 'prospect_touchpoints',
             'attribution_credits', 'ingestion_sessions', 'ingestion_session_steps', 'rollup_pending'))
  LOOP
    EXECUTE format('REVOKE ALL ON SEQUENCE %I FROM PUBLIC, anon, authenticated', v_seq);
  END LOOP;

  -- derive's functions (the definer ones among them write the run log) are for service_role and
  -- the triggers; the client roles call none of them.
  FOR v_fn IN
    SELECT p.oid::regprocedure FROM pg_proc p
     WHERE p.pronamespace = v_schema
       AND (p.proname LIKE 'derive\_%' OR p.proname = 'run_audience_derivation_batch')
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM anon, authenticated', v_fn);
  END LOOP;
END
$$;

DO $$
BEGIN
  EXECUTE format('ALTER FUNCTION derive_settle_grants() SET search_path = pg_catalog, %I, pg_temp',
                 current_schema());
END
$$;
REVOKE ALL ON FUNCTION derive_settle_grants() FROM PUBLIC, anon, authenticated, service_role;

SELECT derive_settle_grants();
