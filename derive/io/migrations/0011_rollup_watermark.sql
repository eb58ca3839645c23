-- The rollup's watermark: which surface_metrics rows a rollup has not seen yet, exact under
-- concurrency.
--
-- Every row carries the id of the transaction that inserted it (xid8). A rollup records its read
-- snapshot (pg_current_snapshot()); the next one reads only the rows whose xid is not visible in
-- that snapshot (xid >= pg_snapshot_xmin(base) AND NOT pg_visible_in_snapshot(xid, base)). Rows of
-- transactions still open while the base read are among them; a timestamp or sequence cursor
-- would lose them. Rows that existed before this migration have no xid and count as seen: the
-- first rollup after it is a full one (no base carries a snapshot yet).
ALTER TABLE surface_metrics ADD COLUMN IF NOT EXISTS xid xid8;
ALTER TABLE surface_metrics ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS idx_surface_metrics_xid ON surface_metrics (xid);

-- Source rows a rollup saw but could not use yet: fetched after its as_of, or of a key whose
-- aggregate was still fresh (the cadence decides when it is recomputed). Replaced by every run.
CREATE TABLE IF NOT EXISTS rollup_pending (
  user_id      uuid NOT NULL,
  metric_kind  surface_metric_kind NOT NULL,
  window_start timestamptz NOT NULL,
  window_end   timestamptz NOT NULL,
  fetched_at   timestamptz NOT NULL
);
ALTER TABLE rollup_pending ENABLE ROW LEVEL SECURITY;
ALTER TABLE rollup_pending FORCE ROW LEVEL SECURITY;
REVOKE ALL ON rollup_pending FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_pending TO service_role;
DROP POLICY IF EXISTS service_role_all ON rollup_pending;
CREATE POLICY service_role_all ON rollup_pending FOR ALL TO service_role
  USING (true) WITH CHECK (true);
