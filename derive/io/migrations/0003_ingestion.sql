-- Ingestion sessions: one row per adapter output ingested (derive ingest ...), with its steps
-- tier_check -> fetch -> parse -> persist -> audit, the adapter's health note kept verbatim and
-- when the adapter wants to be polled next.

CREATE TABLE IF NOT EXISTS ingestion_sessions (
  id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  kind               text NOT NULL CHECK (kind IN ('surface_metrics', 'prospect_touchpoints')),
  user_id            uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  org_id             uuid NULL REFERENCES orgs(id) ON DELETE CASCADE,
  surface            text NOT NULL,
  source             text NOT NULL,
  file_name          text,
  status             text NOT NULL CHECK (status IN ('succeeded', 'partial', 'rejected')),
  rows_received      integer NOT NULL CHECK (rows_received >= 0),
  rows_inserted      integer NOT NULL CHECK (rows_inserted >= 0),
  rows_rejected      integer NOT NULL CHECK (rows_rejected >= 0),
  rejected_by_reason jsonb NOT NULL DEFAULT '{}'::jsonb,
  rejections         jsonb NOT NULL DEFAULT '[]'::jsonb,
  health_note        text NOT NULL,
  next_poll_after_ms bigint CHECK (next_poll_after_ms >= 0),
  next_poll_after    timestamptz,
  started_at         timestamptz NOT NULL,
  finished_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
  CHECK (rows_inserted + rows_rejected <= rows_received)
);
CREATE INDEX IF NOT EXISTS idx_ingestion_sessions_user_surface
  ON ingestion_sessions (user_id, surface, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_ingestion_sessions_next_poll
  ON ingestion_sessions (user_id, surface, next_poll_after DESC);

CREATE TABLE IF NOT EXISTS ingestion_session_steps (
  session_id  uuid NOT NULL REFERENCES ingestion_sessions(id) ON DELETE CASCADE,
  ordinal     smallint NOT NULL CHECK (ordinal BETWEEN 1 AND 5),
  step        text NOT NULL CHECK (step IN ('tier_check', 'fetch', 'parse', 'persist', 'audit')),
  status      text NOT NULL CHECK (status IN ('ok', 'empty', 'partial', 'rejected', 'skipped')),
  started_at  timestamptz NOT NULL,
  finished_at timestamptz NOT NULL,
  detail      jsonb NOT NULL DEFAULT '{}'::jsonb,
  PRIMARY KEY (session_id, ordinal),
  UNIQUE (session_id, step)
);

ALTER TABLE ingestion_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE ingestion_sessions FORCE ROW LEVEL SECURITY;
ALTER TABLE ingestion_session_steps ENABLE ROW LEVEL SECURITY;
ALTER TABLE ingestion_session_steps FORCE ROW LEVEL SECURITY;

REVOKE ALL ON ingestion_sessions, ingestion_session_steps FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON ingestion_sessions, ingestion_session_steps TO service_role;
GRANT SELECT ON ingestion_sessions, ingestion_session_steps TO authenticated;

DROP POLICY IF EXISTS service_role_all ON ingestion_sessions;
CREATE POLICY service_role_all ON ingestion_sessions FOR ALL TO service_role
  USING (true) WITH CHECK (true);
DROP POLICY IF EXISTS service_role_all ON ingestion_session_steps;
CREATE POLICY service_role_all ON ingestion_session_steps FOR ALL TO service_role
  USING (true) WITH CHECK (true);

-- Tenant isolation: an unset or empty setting matches nothing instead of raising.
DROP POLICY IF EXISTS tenant_isolation ON ingestion_sessions;
CREATE POLICY tenant_isolation ON ingestion_sessions FOR SELECT TO authenticated
  USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid
         OR org_id = nullif(current_setting('app.org_id', true), '')::uuid);
DROP POLICY IF EXISTS tenant_isolation ON ingestion_session_steps;
CREATE POLICY tenant_isolation ON ingestion_session_steps FOR SELECT TO authenticated
  USING (EXISTS (SELECT 1 FROM ingestion_sessions s WHERE s.id = session_id));
