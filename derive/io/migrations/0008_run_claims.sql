-- What a run may claim about itself (SPEC §1, §2.10). A run row is created and finished only through
-- derive's functions, but whoever holds service_role can call them; so the functions accept only
-- claims the server can check:
-- * as_of must be a time every client can represent (1900..9000) and lookback a positive span of at
--   most 100 years: 'infinity' or year 20000 would break every later reader of the run log;
-- * the read snapshot a finishing run records (the next incremental run's watermark) must be one
--   that could have existed while the run ran: not older than the server's snapshot when the run
--   started, not newer than the server's snapshot when it finishes, and listing as in progress every
--   transaction that is still in progress now and started before it. A forged snapshot that claims
--   to have seen rows of the future, or of transactions still open, would make the next incremental
--   run skip those rows; it is refused instead.

ALTER TABLE derivation_runs ADD COLUMN IF NOT EXISTS start_snapshot pg_snapshot;

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
  IF p_as_of IS NULL OR NOT (p_as_of BETWEEN '1900-01-01 00:00:00+00' AND '9000-01-01 00:00:00+00') THEN
    RAISE EXCEPTION 'derive_start_run: as_of % is outside 1900-01-01..9000-01-01', p_as_of
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_lookback IS NOT NULL AND NOT (p_lookback > interval '0' AND p_lookback <= interval '100 years') THEN
    RAISE EXCEPTION 'derive_start_run: lookback % is not a positive span of at most 100 years', p_lookback
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
                               lease_expires_at, token_sha256, backend_pid, start_snapshot)
  VALUES (p_job, p_as_of, p_lookback, p_rules_version, coalesce(p_args, '{}'), p_lock,
          clock_timestamp() + make_interval(secs => p_lease_seconds),
          sha256(convert_to(v_token, 'UTF8')), NULL, pg_current_snapshot())
  RETURNING derivation_runs.run_id INTO v_id;
  RETURN QUERY SELECT v_id, v_token, 'running'::text, NULL::uuid;
END
$$;

CREATE OR REPLACE FUNCTION derive_finish_run(
  p_run_id uuid, p_token text, p_status text, p_counts jsonb, p_timings jsonb, p_error text,
  p_extra jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  v_claim pg_snapshot;
  v_start pg_snapshot;
  v_now pg_snapshot := pg_current_snapshot();
BEGIN
  IF p_status NOT IN ('succeeded', 'failed') THEN
    RAISE EXCEPTION 'derive_finish_run: status must be succeeded or failed, got %', p_status
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_claim := (p_extra ->> 'read_snapshot')::pg_snapshot;
  IF v_claim IS NOT NULL THEN
    SELECT r.start_snapshot INTO v_start FROM derivation_runs r WHERE r.run_id = p_run_id;
    IF v_start IS NULL
       OR pg_snapshot_xmin(v_claim) < pg_snapshot_xmin(v_start)
       OR pg_snapshot_xmax(v_claim) < pg_snapshot_xmax(v_start)
       OR pg_snapshot_xmax(v_claim) > pg_snapshot_xmax(v_now)
       OR EXISTS (SELECT 1 FROM pg_snapshot_xip(v_now) AS open(xid)
                   WHERE open.xid < pg_snapshot_xmax(v_claim)
                     AND pg_visible_in_snapshot(open.xid, v_claim)) THEN
      RAISE EXCEPTION 'derive_finish_run: run % claims read snapshot %, which no snapshot between its start (%) and now (%) can be',
        p_run_id, v_claim, v_start, v_now
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
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
         read_snapshot = v_claim
   WHERE r.run_id = p_run_id AND r.status = 'running'
     AND r.token_sha256 = sha256(convert_to(coalesce(p_token, ''), 'UTF8'));
  IF NOT FOUND THEN
    RAISE EXCEPTION 'run % is not running any more (its lease expired, or the token is wrong)', p_run_id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
END
$$;

-- CREATE OR REPLACE keeps the grants (service_role only, 0007) but not the settings: pin again.
DO $$
DECLARE f regprocedure;
BEGIN
  FOREACH f IN ARRAY ARRAY[
      'derive_start_run(text, text, timestamptz, interval, text, jsonb, integer)'::regprocedure,
      'derive_finish_run(uuid, text, text, jsonb, jsonb, text, jsonb)'::regprocedure] LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
  END LOOP;
END
$$;
