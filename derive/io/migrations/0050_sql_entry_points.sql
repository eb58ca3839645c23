-- Seed 001's SQL entry points (SPEC §2.12), for pg_cron jobs and RPC callers. They only record
-- requests in derive_requests and wake `derive watch` (NOTIFY on the insert trigger's channel,
-- empty payload); the watcher's incremental run derives the requested users with the same code as
-- every other run and marks the requests done with its run id. No rule is implemented in SQL.
--
-- A request of an unknown user is served like any other: the run finds nothing to derive and
-- marks it done. A run that fails leaves its requests pending; the next run serves them again.

-- Ask for one user's state to be derived; returns the request id (see derive_request_status).
CREATE OR REPLACE FUNCTION derive_audience_state(p_user_id uuid) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  v_id bigint;
BEGIN
  IF p_user_id IS NULL THEN
    RAISE EXCEPTION 'derive_audience_state: p_user_id is null'
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Pass the uuid of the user whose audience state should be derived.';
  END IF;
  INSERT INTO derive_requests (user_id) VALUES (p_user_id) RETURNING id INTO v_id;
  PERFORM pg_notify('derive_audience_events', '');
  RETURN v_id;
END
$$;

-- Ask for the p_limit most recently active users (latest non-system event first) to be derived;
-- returns how many were requested. p_limit 0 or negative requests nobody and returns 0.
CREATE OR REPLACE FUNCTION run_audience_derivation_batch(p_limit integer DEFAULT 250)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
  v_n integer;
BEGIN
  IF p_limit IS NULL THEN
    RAISE EXCEPTION 'run_audience_derivation_batch: p_limit is null'
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Pass how many of the most recently active users to derive (default 250).';
  END IF;
  IF p_limit <= 0 THEN
    RETURN 0;
  END IF;
  INSERT INTO derive_requests (user_id)
  SELECT a.user_id
    FROM (SELECT e.user_id, max(e.created_at) AS last_at
            FROM audience_events e
           WHERE e.user_id IS NOT NULL AND e.event_category <> 'system'
           GROUP BY e.user_id
           ORDER BY last_at DESC, e.user_id
           LIMIT p_limit) a;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n > 0 THEN
    PERFORM pg_notify('derive_audience_events', '');
  END IF;
  RETURN v_n;
END
$$;

-- The outcome of a request: pending, done (with the run that served it) or failed (with the error).
-- An unknown id returns no row.
CREATE OR REPLACE FUNCTION derive_request_status(p_id bigint)
RETURNS TABLE (status text, run_id uuid, error text)
LANGUAGE plpgsql SECURITY DEFINER STABLE AS $$
BEGIN
  IF p_id IS NULL THEN
    RAISE EXCEPTION 'derive_request_status: p_id is null'
      USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Pass the id returned by derive_audience_state.';
  END IF;
  RETURN QUERY SELECT r.status, r.run_id, r.error FROM derive_requests r WHERE r.id = p_id;
END
$$;

REVOKE ALL ON FUNCTION derive_audience_state(uuid), run_audience_derivation_batch(integer),
  derive_request_status(bigint)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION derive_audience_state(uuid), run_audience_derivation_batch(integer),
  derive_request_status(bigint)
  TO service_role;

-- Pinned like every derive function (0007): catalog, derive's schema, the temp schema last.
DO $$
DECLARE f regprocedure;
BEGIN
  FOREACH f IN ARRAY ARRAY['derive_audience_state(uuid)'::regprocedure,
                           'run_audience_derivation_batch(integer)'::regprocedure,
                           'derive_request_status(bigint)'::regprocedure] LOOP
    EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
  END LOOP;
END
$$;
