-- What derive_settle_grants() (migration 0051) does for derive's objects, for the objects of
-- migration 0012: the stored aggregates (metric_aggregate_rows, the table metric_aggregates
-- was), rollup_clock and the metric_aggregates view (GRANT ALL ON ALL TABLES reaches views too).
-- `derive db migrate` calls it after derive_settle_grants() on every migration run.

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
       AND c.relname IN ('metric_aggregate_rows', 'rollup_clock', 'metric_aggregates')
  LOOP
    EXECUTE format('REVOKE TRUNCATE, REFERENCES, TRIGGER%s ON %I FROM PUBLIC, anon, authenticated,'
                   ' service_role', v_extra, v_table);
    EXECUTE format('REVOKE SELECT, UPDATE, DELETE ON %I FROM anon', v_table);
    EXECUTE format('REVOKE UPDATE, DELETE ON %I FROM authenticated', v_table);
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
