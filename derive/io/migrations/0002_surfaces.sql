-- Surface metrics, their cross-surface aggregates, prospect touchpoints and attribution credits.

CREATE TABLE IF NOT EXISTS users (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  attribution_salt bytea CHECK (attribution_salt IS NULL OR octet_length(attribution_salt) = 32)
);
ALTER TABLE users ADD COLUMN IF NOT EXISTS attribution_salt bytea;
CREATE TABLE IF NOT EXISTS orgs (id uuid PRIMARY KEY DEFAULT gen_random_uuid());
CREATE TABLE IF NOT EXISTS prospects (
  id      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE
);

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'surface_metric_kind') THEN
    CREATE TYPE surface_metric_kind AS ENUM (
      'profile_view', 'search_impression', 'search_rank', 'click_through',
      'dm_inbound', 'dm_outbound', 'reply_rate',
      'subscription_new', 'subscription_total', 'tip_amount', 'tip_count',
      'booking_inquiry', 'booking_confirmed',
      'gross_revenue', 'net_revenue');
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'touchpoint_kind') THEN
    CREATE TYPE touchpoint_kind AS ENUM (
      'profile_view', 'dm_inbound', 'dm_outbound', 'reply', 'reaction', 'tip',
      'subscription_new', 'subscription_renew', 'subscription_cancel',
      'booking_inquiry', 'booking_confirmed', 'booking_completed', 'block', 'unblock');
  END IF;
END
$$;

CREATE TABLE IF NOT EXISTS surface_metrics (
  id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id       uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  org_id        uuid NULL REFERENCES orgs(id) ON DELETE CASCADE,
  surface       text NOT NULL,
  metric_kind   surface_metric_kind NOT NULL,
  window_start  timestamptz NOT NULL,
  window_end    timestamptz NOT NULL,
  value_numeric numeric(18, 4),
  value_text    text,
  currency      text,
  source        text NOT NULL,
  fetched_at    timestamptz NOT NULL DEFAULT now(),
  payload_jsonb jsonb,
  created_at    timestamptz NOT NULL DEFAULT now(),
  CHECK (window_end > window_start),
  CHECK (value_numeric IS NOT NULL OR value_text IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS idx_surface_metrics_user_surface_kind
  ON surface_metrics (user_id, surface, metric_kind, window_end DESC);
CREATE INDEX IF NOT EXISTS idx_surface_metrics_org_surface_kind
  ON surface_metrics (org_id, surface, metric_kind, window_end DESC) WHERE org_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_surface_metrics_dedup
  ON surface_metrics (user_id, surface, metric_kind, window_start, window_end, fetched_at DESC);

CREATE TABLE IF NOT EXISTS metric_aggregates (
  id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id           uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  org_id            uuid NULL REFERENCES orgs(id) ON DELETE CASCADE,
  metric_kind       surface_metric_kind NOT NULL,
  window_start      timestamptz NOT NULL,
  window_end        timestamptz NOT NULL,
  value_numeric     numeric(18, 4) NOT NULL,
  currency          text,
  surfaces_included text[] NOT NULL,
  surface_breakdown jsonb NOT NULL,
  computed_at       timestamptz NOT NULL DEFAULT now(),
  stale_after       timestamptz NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT now(),
  UNIQUE (user_id, metric_kind, window_start, window_end)
);
CREATE INDEX IF NOT EXISTS idx_aggregates_user_kind_window
  ON metric_aggregates (user_id, metric_kind, window_end DESC);
CREATE INDEX IF NOT EXISTS idx_aggregates_stale ON metric_aggregates (stale_after);

CREATE TABLE IF NOT EXISTS prospect_touchpoints (
  id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  user_id                     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  org_id                      uuid NULL REFERENCES orgs(id) ON DELETE CASCADE,
  prospect_id                 uuid NULL REFERENCES prospects(id) ON DELETE SET NULL,
  surface                     text NOT NULL,
  touchpoint                  touchpoint_kind NOT NULL,
  external_id                 text,
  identifier_hash             bytea,
  occurred_at                 timestamptz NOT NULL,
  payload_jsonb               jsonb,
  attributed_to_touchpoint_id uuid NULL REFERENCES prospect_touchpoints(id),
  ingestion_source            text NOT NULL,
  created_at                  timestamptz NOT NULL DEFAULT now(),
  UNIQUE (surface, external_id) DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX IF NOT EXISTS idx_touchpoints_prospect_time
  ON prospect_touchpoints (prospect_id, occurred_at DESC) WHERE prospect_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_touchpoints_user_surface_time
  ON prospect_touchpoints (user_id, surface, occurred_at DESC);
CREATE INDEX IF NOT EXISTS idx_touchpoints_identifier_hash
  ON prospect_touchpoints (user_id, identifier_hash) WHERE identifier_hash IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_touchpoints_anonymous
  ON prospect_touchpoints (user_id, surface, occurred_at DESC) WHERE prospect_id IS NULL;

CREATE TABLE IF NOT EXISTS attribution_credits (
  id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  conversion_id    uuid NOT NULL REFERENCES prospect_touchpoints(id) ON DELETE CASCADE,
  touchpoint_id    uuid NULL REFERENCES prospect_touchpoints(id) ON DELETE CASCADE,
  user_id          uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  org_id           uuid NULL REFERENCES orgs(id) ON DELETE CASCADE,
  prospect_id      uuid NULL,
  surface          text NOT NULL,
  model            text NOT NULL
                   CHECK (model IN ('first_touch', 'last_touch', 'linear', 'time_decay', 'position_based')),
  weight           double precision NOT NULL,
  attributed_value numeric NOT NULL,
  currency         text,
  window_days      double precision NOT NULL,
  half_life_days   double precision,
  run_id           uuid,
  computed_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE NULLS NOT DISTINCT (conversion_id, model, touchpoint_id)
);
CREATE INDEX IF NOT EXISTS idx_attribution_user_model ON attribution_credits (user_id, model);

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
ALTER TABLE orgs ENABLE ROW LEVEL SECURITY;
ALTER TABLE orgs FORCE ROW LEVEL SECURITY;
ALTER TABLE prospects ENABLE ROW LEVEL SECURITY;
ALTER TABLE prospects FORCE ROW LEVEL SECURITY;
ALTER TABLE surface_metrics ENABLE ROW LEVEL SECURITY;
ALTER TABLE surface_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE metric_aggregates ENABLE ROW LEVEL SECURITY;
ALTER TABLE metric_aggregates FORCE ROW LEVEL SECURITY;
ALTER TABLE prospect_touchpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE prospect_touchpoints FORCE ROW LEVEL SECURITY;
ALTER TABLE attribution_credits ENABLE ROW LEVEL SECURITY;
ALTER TABLE attribution_credits FORCE ROW LEVEL SECURITY;

REVOKE ALL ON users, orgs, prospects, surface_metrics, metric_aggregates, prospect_touchpoints,
  attribution_credits FROM PUBLIC, anon, authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON users, orgs, prospects, surface_metrics, metric_aggregates,
  prospect_touchpoints, attribution_credits TO service_role;
GRANT SELECT ON surface_metrics, metric_aggregates, prospect_touchpoints, attribution_credits,
  prospects TO authenticated;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['users', 'orgs', 'prospects', 'surface_metrics', 'metric_aggregates',
                           'prospect_touchpoints', 'attribution_credits'] LOOP
    EXECUTE format('DROP POLICY IF EXISTS service_role_all ON %I', t);
    EXECUTE format('CREATE POLICY service_role_all ON %I FOR ALL TO service_role USING (true) WITH CHECK (true)', t);
  END LOOP;
  FOREACH t IN ARRAY ARRAY['surface_metrics', 'metric_aggregates', 'prospect_touchpoints',
                           'attribution_credits'] LOOP
    EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %I', t);
    EXECUTE format($p$CREATE POLICY tenant_isolation ON %I FOR SELECT TO authenticated
      USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid
             OR org_id = nullif(current_setting('app.org_id', true), '')::uuid)$p$, t);
  END LOOP;
END
$$;
DROP POLICY IF EXISTS tenant_isolation ON prospects;
CREATE POLICY tenant_isolation ON prospects FOR SELECT TO authenticated
  USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid);
