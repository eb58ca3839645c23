-- Mode B (`derive watch`): an insert trigger that announces which users got new events, and the
-- state-history tables written by `derive backfill --table`.

-- One statement-level trigger per INSERT statement (COPY included), never per row: the distinct
-- non-null, non-system user ids of the statement, 200 per notification (37 bytes each, well under
-- the 8000-byte payload limit). System rows are skipped so the job's own audit rows never wake the
-- watcher. A bulk loader that needs no watcher can switch it off for its session or transaction
-- with set_config('derive.notify', 'off', ...).
CREATE OR REPLACE FUNCTION derive_notify_audience_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  v_chunk text;
BEGIN
  IF coalesce(current_setting('derive.notify', true), '') = 'off' THEN
    RETURN NULL;
  END IF;
  FOR v_chunk IN
    SELECT string_agg(u.user_id::text, ',' ORDER BY u.user_id)
      FROM (SELECT d.user_id, (row_number() OVER (ORDER BY d.user_id) - 1) / 200 AS part
              FROM (SELECT DISTINCT n.user_id
                      FROM derive_new_events n
                     WHERE n.user_id IS NOT NULL
                       AND n.event_category <> 'system') d) u
     GROUP BY u.part
  LOOP
    PERFORM pg_notify('derive_audience_events', v_chunk);
  END LOOP;
  RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS audience_events_notify ON audience_events;
CREATE TRIGGER audience_events_notify
  AFTER INSERT ON audience_events
  REFERENCING NEW TABLE AS derive_new_events
  FOR EACH STATEMENT EXECUTE FUNCTION derive_notify_audience_events();

-- State history: one row per (as_of, user) for every user that had a state at that as_of.
CREATE TABLE IF NOT EXISTS audience_state_history (
  as_of            timestamptz NOT NULL,
  user_id          uuid NOT NULL,
  current_state    text NOT NULL CHECK (current_state IN ('S0', 'S1', 'S2', 'S3', 'S4', 'S5')),
  state_updated_at timestamptz NOT NULL,
  engagement_score numeric NOT NULL,
  last_event_type  text,
  last_activity_at timestamptz,
  PRIMARY KEY (as_of, user_id)
);

-- A step is complete when its marker row exists (written in the same transaction as its rows),
-- so a resumed backfill knows which steps to skip even when a step had no users. A step's states
-- depend on where its backfill started (origin) and how it stepped: a resume only counts steps
-- of the same origin, step, lookback and rules.
CREATE TABLE IF NOT EXISTS audience_state_history_steps (
  as_of         timestamptz PRIMARY KEY,
  origin        timestamptz NOT NULL,
  step          interval NOT NULL,
  lookback      interval NOT NULL,
  rules_version text NOT NULL,
  users         integer NOT NULL,
  run_id        uuid,
  written_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

ALTER TABLE audience_state_history ENABLE ROW LEVEL SECURITY;
ALTER TABLE audience_state_history FORCE ROW LEVEL SECURITY;
ALTER TABLE audience_state_history_steps ENABLE ROW LEVEL SECURITY;
ALTER TABLE audience_state_history_steps FORCE ROW LEVEL SECURITY;
REVOKE ALL ON audience_state_history, audience_state_history_steps FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON audience_state_history, audience_state_history_steps
  TO service_role;
DROP POLICY IF EXISTS service_role_all ON audience_state_history;
CREATE POLICY service_role_all ON audience_state_history
  FOR ALL TO service_role USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS service_role_all ON audience_state_history_steps;
CREATE POLICY service_role_all ON audience_state_history_steps
  FOR ALL TO service_role USING (true) WITH CHECK (true);
