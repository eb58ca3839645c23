-- derive export / erase find one person's rows by index, whatever the size of the tables:
-- the state history is keyed (as_of, user_id), credits had no index by prospect, prospects none
-- by tenant.
CREATE INDEX IF NOT EXISTS audience_state_history_user_idx ON audience_state_history (user_id);
CREATE INDEX IF NOT EXISTS idx_attribution_prospect
  ON attribution_credits (prospect_id) WHERE prospect_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS idx_prospects_user ON prospects (user_id);
