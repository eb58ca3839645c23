-- derive erase: a person's pending or served derivation requests go too. service_role may only
-- update derive_requests, so the definer path of the run log and the change set (migration 0007)
-- learns the table; everything else about the function is unchanged.
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
  ELSIF p_what = 'derive_requests' THEN
    DELETE FROM derive_requests q WHERE q.user_id = p_user;
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
DO $$
BEGIN
  EXECUTE format('ALTER FUNCTION derive_erase_references(uuid, text, uuid, text)'
                 ' SET search_path = pg_catalog, %I, pg_temp', current_schema());
END
$$;
