-- Roles, the event log, derived audience state, the run log and the write guard.

DO $$
DECLARE r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['service_role', 'anon', 'authenticated'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN
        NULL;  -- created concurrently by another migration of the same cluster
      END;
    END IF;
  END LOOP;
  -- The job connects as the migrating user and switches with SET LOCAL ROLE service_role.
  IF NOT pg_has_role(current_user, 'service_role', 'MEMBER') THEN
    EXECUTE format('GRANT service_role TO %I', current_user);
  END IF;
END
$$;

CREATE TABLE IF NOT EXISTS audience_events (
  id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  created_at     timestamptz NOT NULL DEFAULT now(),
  user_id        uuid NULL,
  session_id     text,
  event_type     text NOT NULL,
  event_category text NOT NULL,
  event_source   text,
  utm_source     text,
  utm_medium     text,
  utm_campaign   text,
  utm_content    text,
  utm_term       text,
  metadata       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS audience_events_user_created_idx ON audience_events (user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS audience_events_session_idx ON audience_events (session_id);
CREATE INDEX IF NOT EXISTS audience_events_created_idx ON audience_events (created_at);
CREATE INDEX IF NOT EXISTS audience_events_system_idx
  ON audience_events (event_type, created_at) WHERE event_category = 'system';

CREATE TABLE IF NOT EXISTS audience_state (
  user_id          uuid PRIMARY KEY,
  current_state    text NOT NULL CHECK (current_state IN ('S0', 'S1', 'S2', 'S3', 'S4', 'S5')),
  state_updated_at timestamptz NOT NULL,
  updated_at       timestamptz NOT NULL DEFAULT now(),
  engagement_score numeric NOT NULL DEFAULT 0,
  last_event_type  text,
  last_activity_at timestamptz,
  metadata         jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS derivation_runs (
  run_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  job           text NOT NULL,
  as_of         timestamptz NOT NULL,
  lookback      interval,
  rules_version text,
  args          jsonb NOT NULL DEFAULT '{}'::jsonb,
  started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
  finished_at   timestamptz,
  status        text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
  backend_pid   integer NOT NULL DEFAULT pg_backend_pid(),
  counts        jsonb NOT NULL DEFAULT '{}'::jsonb,
  timings       jsonb NOT NULL DEFAULT '{}'::jsonb,
  error         text
);
CREATE INDEX IF NOT EXISTS derivation_runs_job_started_idx ON derivation_runs (job, started_at DESC);

-- Only a running derive job, inside its own transaction, may write audience_state.
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
  IF tg_op = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS audience_state_guard ON audience_state;
CREATE TRIGGER audience_state_guard
  BEFORE INSERT OR UPDATE OR DELETE ON audience_state
  FOR EACH ROW EXECUTE FUNCTION derive_guard_audience_state();
DROP TRIGGER IF EXISTS audience_state_guard_truncate ON audience_state;
CREATE TRIGGER audience_state_guard_truncate
  BEFORE TRUNCATE ON audience_state
  FOR EACH STATEMENT EXECUTE FUNCTION derive_guard_audience_state();

-- Row-level security: enabled and forced everywhere.
ALTER TABLE audience_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE audience_events FORCE ROW LEVEL SECURITY;
ALTER TABLE audience_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE audience_state FORCE ROW LEVEL SECURITY;
ALTER TABLE derivation_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE derivation_runs FORCE ROW LEVEL SECURITY;

REVOKE ALL ON audience_events, audience_state, derivation_runs FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON audience_events, audience_state, derivation_runs TO service_role;
GRANT SELECT ON audience_state TO authenticated;
GRANT SELECT, INSERT ON audience_events TO authenticated;
GRANT INSERT ON audience_events TO anon;

DROP POLICY IF EXISTS service_role_all ON audience_events;
CREATE POLICY service_role_all ON audience_events FOR ALL TO service_role USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS service_role_all ON audience_state;
CREATE POLICY service_role_all ON audience_state FOR ALL TO service_role USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS service_role_all ON derivation_runs;
CREATE POLICY service_role_all ON derivation_runs FOR ALL TO service_role USING (true) WITH CHECK (true);

-- Tenant isolation: an unset or empty app.user_id matches nothing instead of raising.
DROP POLICY IF EXISTS tenant_isolation ON audience_state;
CREATE POLICY tenant_isolation ON audience_state FOR SELECT TO authenticated
  USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
DROP POLICY IF EXISTS tenant_isolation ON audience_events;
CREATE POLICY tenant_isolation ON audience_events FOR SELECT TO authenticated
  USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
-- Clients may log their own events, never system rows.
DROP POLICY IF EXISTS own_events_insert ON audience_events;
CREATE POLICY own_events_insert ON audience_events FOR INSERT TO authenticated
  WITH CHECK (user_id = nullif(current_setting('app.user_id', true), '')::uuid
              AND event_category <> 'system');
DROP POLICY IF EXISTS anonymous_events_insert ON audience_events;
CREATE POLICY anonymous_events_insert ON audience_events FOR INSERT TO anon
  WITH CHECK (user_id IS NULL AND event_category <> 'system');
