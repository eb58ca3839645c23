-- derive prune: the raw payloads past their retention are found by an index range scan on the
-- insertion time instead of a scan of the whole table per batch. Partial: rows whose payload is
-- already gone drop out of the surface-metrics index.
CREATE INDEX IF NOT EXISTS idx_surface_metrics_payload_created
  ON surface_metrics (created_at) WHERE payload_jsonb IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_touchpoints_payload_created
  ON prospect_touchpoints (created_at) WHERE payload_jsonb IS NOT NULL;
