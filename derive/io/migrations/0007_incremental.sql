-- Incremental runs (SPEC §2.10), a run lifecycle that holds through transaction-mode poolers
-- (SPEC §2.12) and a guard that cannot be fooled from inside a session (SPEC §1).

-- 1. The watermark: every event row carries the id of the transaction that inserted it. A run
-- records its read snapshot; the next run finds exactly the rows that snapshot could not see
-- (xid >= its xmin and not visible in it), whatever their created_at, including rows of
-- transactions that were still open when it read. Existing rows get the migrating transaction's
-- id, which no recorded snapshot predates (the first run after this migration is a full run).
ALTER TABLE audience_events
  ADD COLUMN IF NOT EXISTS ingest_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS audience_events_ingest_xid_idx
  ON audience_events (ingest_xid) INCLUDE (user_id)
  WHERE user_id IS NOT NULL AND event_category <> 'system';

-- Clients cannot choose the watermark of their rows: they insert every column but ingest_xid.
REVOKE INSERT ON audience_events FROM anon, authenticated;
GRANT INSERT (id, created_at, user_id, session_id, event_type, event_category, event_source,
              utm_source, utm_medium, utm_campaign, utm_content, utm_term, metadata)
  ON audience_events TO anon, authenticated;

-- Updates and deletes of events (rare: corrections, erasure, retention) are recorded per user and
-- transaction by statement-level triggers, so an incremental run sees them as well.
CREATE TABLE IF NOT EXISTS audience_event_changes (
  xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
  user_id    uuid NOT NULL,
  changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS audience_event_changes_xid_idx ON audience_event_changes (xid);

CREATE OR REPLACE FUNCTION derive_record_event_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  IF tg_op = 'UPDATE' THEN
    INSERT INTO audience_event_changes (user_id)
    SELECT DISTINCT u.user_id
      FROM (SELECT o.user_id FROM derive_old_events o
             WHERE o.event_category IS DISTINCT FROM 'system'
            UNION ALL
            SELECT n.user_id FROM derive_changed_events n
             WHERE n.event_category IS DISTINCT FROM 'system') u
     WHERE u.user_id IS NOT NULL;
  ELSE
    INSERT INTO audience_event_changes (user_id)
    SELECT DISTINCT o.user_id FROM derive_old_events o
     WHERE o.user_id IS NOT NULL AND o.event_category IS DISTINCT FROM 'system';
  END IF;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS audience_events_changes_upd ON audience_events;
CREATE TRIGGER audience_events_changes_upd
  AFTER UPDATE ON audience_events
  REFERENCING OLD TABLE AS derive_old_events NEW TABLE AS derive_changed_events
  FOR EACH STATEMENT EXECUTE FUNCTION derive_record_event_changes();
DROP TRIGGER IF EXISTS audience_events_changes_del ON audience_events;
CREATE TRIGGER audience_events_changes_del
  AFTER DELETE ON audience_events
  REFERENCING OLD TABLE AS derive_old_events
  FOR EACH STATEMENT EXECUTE FUNCTION derive_record_event_changes();

-- Notifications only wake the watcher (any role may NOTIFY any channel): one empty payload per
-- INSERT statement that holds a derivable row. What to derive always comes from the watermark.
CREATE OR REPLACE FUNCTION derive_notify_audience_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF coalesce(current_setting('derive.notify', true), '') = 'off' THEN
    RETURN NULL;
  END IF;
  IF EXISTS (SELECT 1 FROM derive_new_events n
              WHERE n.user_id IS NOT NULL AND n.event_category <> 'system') THEN
    PERFORM pg_notify('derive_audience_events', '');
  END IF;
  RETURN NULL;
END
$$;

-- Retention crossings are found by a range scan over last_activity_at (SPEC §2.10 reason 4).
CREATE INDEX IF NOT EXISTS audience_state_last_activity_idx ON audience_state (last_activity_at);

-- 2. The run log. Run rows are created, extended and finished only through the functions below;
-- service_role (and everyone but the owner) may read them, never insert, update or delete.
ALTER TABLE derivation_runs
  ADD COLUMN IF NOT EXISTS lock_name        text,
  ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz,
  ADD COLUMN IF NOT EXISTS token_sha256     bytea,
  ADD COLUMN IF NOT EXISTS started_by       text NOT NULL DEFAULT session_user,
  ADD COLUMN IF NOT EXISTS application_name text
                           DEFAULT nullif(current_setting('application_name', true), ''),
  ADD COLUMN IF NOT EXISTS mode             text
                           CHECK (mode IN ('full', 'incremental', 'users')),
  ADD COLUMN IF NOT EXISTS full_reason      text,
  ADD COLUMN IF NOT EXISTS base_run_id      uuid,
  ADD COLUMN IF NOT EXISTS read_snapshot    pg_snapshot;
ALTER TABLE derivation_runs ALTER COLUMN backend_pid DROP NOT NULL;
CREATE INDEX IF NOT EXISTS derivation_runs_running_idx
  ON derivation_runs (lock_name) WHERE status = 'running';

REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON derivation_runs FROM service_role;
DROP POLICY IF EXISTS service_role_all ON derivation_runs;
DROP POLICY IF EXISTS service_role_read ON derivation_runs;
CREATE POLICY service_role_read ON derivation_runs FOR SELECT TO service_role USING (true);

-- Which runs wrote audience_state: filled by the guard (through a definer function), readable by
-- service_role, writable by nobody else. A run that wrote and never finished is flagged by
-- `derive status` and `derive report`.
CREATE TABLE IF NOT EXISTS derive_run_writes (
  run_id     uuid NOT NULL,
  table_name text NOT NULL,
  first_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (run_id, table_name)
);

-- Users rejected by a fail-safe in the latest run that evaluated them (SPEC §2.10 reason 5).
CREATE TABLE IF NOT EXISTS derive_rejected_users (
  user_id     uuid PRIMARY KEY,
  reasons_key text NOT NULL,
  run_id      uuid NOT NULL
);

-- Requests to derive users (seed 001's SQL entry points record them; `derive watch` serves them).
CREATE TABLE IF NOT EXISTS derive_requests (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  user_id      uuid NOT NULL,
  requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  requested_by text NOT NULL DEFAULT session_user,
  status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
  run_id       uuid,
  error        text,
  finished_at  timestamptz
);
CREATE INDEX IF NOT EXISTS derive_requests_pending_idx ON derive_requests (id) WHERE status = 'pending';

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['audience_event_changes', 'derive_run_writes', 'derive_rejected_users',
                           'derive_requests'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, anon, authenticated, service_role', t);
    EXECUTE format('DROP POLICY IF EXISTS service_role_read ON %I', t);
    EXECUTE format('CREATE POLICY service_role_read ON %I FOR SELECT TO service_role USING (true)', t);
    EXECUTE format('GRANT SELECT ON %I TO service_role', t);
  END LOOP;
  -- The job maintains the rejected set and the requests' outcome in its write transaction.
  GRANT INSERT, UPDATE, DELETE ON derive_rejected_users, derive_requests TO service_role;
  DROP POLICY IF EXISTS service_role_write ON derive_rejected_users;
  CREATE POLICY service_role_write ON derive_rejected_users FOR ALL TO service_role
    USING (true) WITH CHECK (true);
  DROP POLICY IF EXISTS service_role_write ON derive_requests;
  CREATE POLICY service_role_write ON derive_requests FOR UPDATE TO service_role
    USING (true) WITH CHECK (true);
  -- The owner (the migrating role, which owns the definer functions) is subject to FORCE RLS too.
  FOREACH t IN ARRAY ARRAY['derivation_runs', 'audience_event_changes', 'derive_run_writes',
                           'derive_rejected_users', 'derive_requests'] LOOP
    EXECUTE format('DROP POLICY IF EXISTS derive_owner_all ON %I', t);
    EXECUTE format('CREATE POLICY derive_owner_all ON %I FOR ALL TO %I USING (true) WITH CHECK (true)',
                   t, current_user);
  END LOOP;
END
$$;

-- Start a run: one transaction, serialised per lock name by a transaction-level advisory lock
-- (nothing held across transactions, so it works through transaction-mode poolers). A running
-- row whose lease has expired (its process died) is marked failed; a live one makes this run
-- 'skipped'. Returns the new run's id, its secret token (only its hash is stored) and its status.
CREATE OR REPLACE FUNCTION derive_start_run(
  p_job text, p_lock text, p_as_of timestamptz, p_lookback interval, p_rules_version text,
  p_args jsonb, p_lease_seconds integer)
RETURNS TABLE (run_id uuid, token text, status text, holder uuid)
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  v_token text := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
  v_holder uuid;
  v_id uuid;
BEGIN
  IF p_job IS NULL OR p_job !~ '^[a-z][a-z0-9_]{0,39}$' OR p_lock IS NULL OR p_lock !~ '^[a-z][a-z0-9_]{0,39}$' THEN
    RAISE EXCEPTION 'derive_start_run: job and lock must be short lower-case names, got % / %', p_job, p_lock
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 86400 THEN
    RAISE EXCEPTION 'derive_start_run: lease of % seconds is outside 1..86400', p_lease_seconds
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended('derive.lock:' || p_lock, 0));
  UPDATE derivation_runs r
     SET status = 'failed', finished_at = clock_timestamp(),
         error = 'lease expired at ' || r.lease_expires_at || ' without a heartbeat (process killed?)'
   WHERE r.lock_name = p_lock AND r.status = 'running' AND r.lease_expires_at < clock_timestamp();
  SELECT r.run_id INTO v_holder
    FROM derivation_runs r
   WHERE r.lock_name = p_lock AND r.status = 'running'
   LIMIT 1;
  IF v_holder IS NOT NULL THEN
    INSERT INTO derivation_runs (job, as_of, lookback, rules_version, args, status, finished_at,
                                 error, lock_name, backend_pid)
    VALUES (p_job, p_as_of, p_lookback, p_rules_version, coalesce(p_args, '{}'), 'skipped',
            clock_timestamp(), 'another run holds the lock: ' || v_holder, p_lock, NULL)
    RETURNING derivation_runs.run_id INTO v_id;
    RETURN QUERY SELECT v_id, NULL::text, 'skipped'::text, v_holder;
    RETURN;
  END IF;
  INSERT INTO derivation_runs (job, as_of, lookback, rules_version, args, lock_name,
                               lease_expires_at, token_sha256, backend_pid)
  VALUES (p_job, p_as_of, p_lookback, p_rules_version, coalesce(p_args, '{}'), p_lock,
          clock_timestamp() + make_interval(secs => p_lease_seconds),
          sha256(convert_to(v_token, 'UTF8')), NULL)
  RETURNING derivation_runs.run_id INTO v_id;
  RETURN QUERY SELECT v_id, v_token, 'running'::text, NULL::uuid;
END
$$;

-- Extend the lease of a running run; false when the run is no longer running (or the token is wrong).
CREATE OR REPLACE FUNCTION derive_heartbeat(p_run_id uuid, p_token text, p_lease_seconds integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  UPDATE derivation_runs r
     SET lease_expires_at = clock_timestamp() + make_interval(secs => least(greatest(p_lease_seconds, 1), 86400))
   WHERE r.run_id = p_run_id AND r.status = 'running'
     AND r.token_sha256 = sha256(convert_to(coalesce(p_token, ''), 'UTF8'))
     AND r.lease_expires_at >= clock_timestamp();
  RETURN FOUND;
END
$$;

-- Finish a running run of the caller's own (the token proves it): forward only, never back.
CREATE OR REPLACE FUNCTION derive_finish_run(
  p_run_id uuid, p_token text, p_status text, p_counts jsonb, p_timings jsonb, p_error text,
  p_extra jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  IF p_status NOT IN ('succeeded', 'failed') THEN
    RAISE EXCEPTION 'derive_finish_run: status must be succeeded or failed, got %', p_status
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  UPDATE derivation_runs r
     SET status = p_status,
         finished_at = clock_timestamp(),
         lease_expires_at = NULL,
         counts = coalesce(p_counts, '{}'),
         timings = coalesce(p_timings, '{}'),
         error = left(p_error, 2000),
         mode = p_extra ->> 'mode',
         full_reason = p_extra ->> 'full_reason',
         base_run_id = (p_extra ->> 'base_run_id')::uuid,
         read_snapshot = (p_extra ->> 'read_snapshot')::pg_snapshot
   WHERE r.run_id = p_run_id AND r.status = 'running'
     AND r.token_sha256 = sha256(convert_to(coalesce(p_token, ''), 'UTF8'));
  IF NOT FOUND THEN
    RAISE EXCEPTION 'run % is not running any more (its lease expired, or the token is wrong)', p_run_id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION derive_note_write(p_run_id uuid, p_table text) RETURNS void
LANGUAGE sql SECURITY DEFINER AS $$
  INSERT INTO derive_run_writes (run_id, table_name) VALUES (p_run_id, p_table)
  ON CONFLICT DO NOTHING;
$$;

-- The guard: a write of audience_state passes only as service_role, inside a transaction whose
-- run marker names a running run of a job allowed to write it, whose lease is alive, and whose
-- secret token the transaction holds. Independent of the backend pid (poolers), of temp tables
-- named like derive's (search_path is pinned below) and of rows service_role could forge (it can
-- neither insert nor rewrite run rows). Every passing statement is recorded per run.
CREATE OR REPLACE FUNCTION derive_guard_audience_state() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  v_run text := nullif(current_setting('derive.run_id', true), '');
  v_token text := coalesce(current_setting('derive.run_token', true), '');
  v_ok boolean := false;
BEGIN
  IF current_user = 'service_role'
     AND v_run ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
    SELECT true INTO v_ok
      FROM derivation_runs r
     WHERE r.run_id = v_run::uuid
       AND r.status = 'running'
       AND r.job IN ('derive', 'adopt', 'erase')
       AND r.lease_expires_at >= statement_timestamp()
       AND r.token_sha256 = sha256(convert_to(v_token, 'UTF8'));
  END IF;
  IF NOT coalesce(v_ok, false) THEN
    RAISE EXCEPTION 'audience_state is derived data: % by role % was rejected', tg_op, current_user
      USING ERRCODE = 'insufficient_privilege',
            DETAIL = 'Only a running derive job may write audience_state, as service_role, inside its own transaction.',
            HINT = 'Run "derive run"; to take over states written by another system run "derive db adopt".';
  END IF;
  PERFORM derive_note_write(v_run::uuid, tg_table_name);
  RETURN NULL;
END
$$;

-- Erasure (`derive erase`) removes a person from the two places service_role may not write: the
-- user lists of run rows (the run stays, the id becomes "erased") and the change set. Only a
-- running erase run holding its token may do it.
CREATE OR REPLACE FUNCTION derive_erase_references(p_run_id uuid, p_token text, p_user uuid, p_what text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  v_n integer;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM derivation_runs r
                  WHERE r.run_id = p_run_id AND r.job = 'erase' AND r.status = 'running'
                    AND r.lease_expires_at >= statement_timestamp()
                    AND r.token_sha256 = sha256(convert_to(coalesce(p_token, ''), 'UTF8'))) THEN
    RAISE EXCEPTION 'derive_erase_references: run % is not a running erase of the caller', p_run_id
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF p_what = 'derivation_runs' THEN
    UPDATE derivation_runs t
       SET args = jsonb_set(t.args, '{users}', (
             SELECT jsonb_agg(CASE WHEN e.u = to_jsonb(p_user::text) THEN '"erased"'::jsonb
                                   ELSE e.u END ORDER BY e.o)
               FROM jsonb_array_elements(t.args -> 'users') WITH ORDINALITY AS e(u, o)))
     WHERE jsonb_typeof(t.args -> 'users') = 'array' AND t.args -> 'users' ? p_user::text;
  ELSIF p_what = 'audience_event_changes' THEN
    -- Counted: the rows that were there; not counted: those this erase's own deletes just added.
    DELETE FROM audience_event_changes c
     WHERE c.user_id = p_user AND c.xid <> pg_current_xact_id();
    GET DIAGNOSTICS v_n = ROW_COUNT;
    DELETE FROM audience_event_changes c WHERE c.user_id = p_user;
    RETURN v_n;
  ELSE
    RAISE EXCEPTION 'derive_erase_references: unknown table %', p_what
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

REVOKE ALL ON FUNCTION derive_erase_references(uuid, text, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION derive_erase_references(uuid, text, uuid, text) TO service_role;

REVOKE ALL ON FUNCTION derive_start_run(text, text, timestamptz, interval, text, jsonb, integer),
  derive_heartbeat(uuid, text, integer),
  derive_finish_run(uuid, text, text, jsonb, jsonb, text, jsonb),
  derive_note_write(uuid, text),
  derive_record_event_changes()
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION derive_start_run(text, text, timestamptz, interval, text, jsonb, integer),
  derive_heartbeat(uuid, text, integer),
  derive_finish_run(uuid, text, text, jsonb, jsonb, text, jsonb),
  derive_note_write(uuid, text)
  TO service_role;

-- Pin every derive function's search_path: catalog first, then derive's own schema, and the
-- session's temp schema explicitly last, so a temp table named like a derive table is never read.
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_proc p
     WHERE p.pronamespace = current_schema()::regnamespace AND p.proname LIKE 'derive\_%'
  LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
  END LOOP;
END
$$;
