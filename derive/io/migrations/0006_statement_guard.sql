-- The audience_state guard checks once per statement instead of once per row: the decision
-- (role, run marker, running run of this session) cannot differ between rows of one statement,
-- and the per-row lookup cost ~1 s per 100k upserted states.

CREATE OR REPLACE FUNCTION derive_guard_audience_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  v_setting text := nullif(current_setting('derive.run_id', true), '');
  v_ok boolean := false;
BEGIN
  IF current_user = 'service_role' AND v_setting IS NOT NULL
     AND v_setting ~ '^[0-9a-fA-F-]{36}$' THEN
    SELECT true INTO v_ok
      FROM derivation_runs r
     WHERE r.run_id = v_setting::uuid
       AND r.status = 'running'
       AND r.backend_pid = pg_backend_pid();
  END IF;
  IF NOT coalesce(v_ok, false) THEN
    RAISE EXCEPTION 'audience_state is derived data: % by role % was rejected', tg_op, current_user
      USING ERRCODE = 'insufficient_privilege',
            DETAIL = 'Only a running derive job may write audience_state, as service_role, inside its own transaction.',
            HINT = 'Run "derive run"; to take over states written by another system run "derive db adopt".';
  END IF;
  IF tg_level = 'STATEMENT' THEN
    RETURN NULL;
  ELSIF tg_op = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS audience_state_guard ON audience_state;
CREATE TRIGGER audience_state_guard
  BEFORE INSERT OR UPDATE OR DELETE ON audience_state
  FOR EACH STATEMENT EXECUTE FUNCTION derive_guard_audience_state();
