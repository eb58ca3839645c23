-- Baseline (a) of the benchmark: the per-user PL/pgSQL derivation that seed 001 publishes, ported
-- so that it compiles and runs against a fixed reference time, and looped over every user.
--
-- What is kept on purpose (it is the logic being measured, defects of SPEC §2.9 included):
--   * one function call per user, each running its own handful of queries against audience_events;
--   * dedupe by (session_id, event_type, calendar second), keep the earliest (§2.9 item 3);
--   * the gate checks read raw events, duplicates and all (item 4);
--   * memoryless gates: every call climbs from S0, then applies R1, R2, R3 once each, in that order
--     (item 7); no fail-safes, unknown categories silently dropped (item 6);
--   * upsert of every user on every call, state_updated_at rewritten each time (item 6);
--   * one log row per state change, shaped like the seed's state_change_logged insert.
--
-- What is fixed so that it runs and can be compared with `derive run`:
--   * the scoring query of the seed has no FROM clause and its metadata helper is never closed; here
--     both are well-formed (item 1 is the same class of defect in the seed's batch runner, whose
--     DISTINCT ... ORDER BY window expression is replaced by a plain loop, bench_baseline.run_batch);
--   * now() is replaced by the argument p_as_of, and every window is closed at p_as_of, as now() is
--     for the seed (nothing can lie in the future of now());
--   * results go to tables of the schema bench_baseline, not to public.audience_state (the guard
--     trigger rejects writes from outside the job) nor to public.audience_events (so the baseline's
--     log rows never feed the job's read, and item 2 cannot arise).

CREATE SCHEMA IF NOT EXISTS bench_baseline;

CREATE TABLE IF NOT EXISTS bench_baseline.audience_state (
  user_id          uuid PRIMARY KEY,
  current_state    text NOT NULL CHECK (current_state IN ('S0', 'S1', 'S2', 'S3', 'S4', 'S5')),
  state_updated_at timestamptz NOT NULL,
  engagement_score numeric NOT NULL DEFAULT 0,
  last_event_type  text,
  metadata         jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS bench_baseline.state_log (
  id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
  user_id        uuid NOT NULL,
  session_id     text,
  event_type     text NOT NULL,
  event_category text NOT NULL,
  event_source   text,
  metadata       jsonb NOT NULL
);

-- Numeric metadata value, NULL when the key is absent; a non-numeric value raises (§2.9 item 5).
CREATE OR REPLACE FUNCTION bench_baseline.meta_num(p_meta jsonb, p_key text) RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN p_meta ? p_key THEN (p_meta ->> p_key)::numeric END
$$;

CREATE OR REPLACE FUNCTION bench_baseline.bench_derive_audience_state(
  p_user_id uuid,
  p_as_of timestamptz
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  since_7d   timestamptz := p_as_of - interval '7 days';
  since_30d  timestamptz := p_as_of - interval '30 days';
  since_60d  timestamptz := p_as_of - interval '60 days';
  since_120d timestamptz := p_as_of - interval '120 days';
  prior_state       text;
  new_state         text := 'S0';
  score             numeric := 0;
  last_type         text;
  sessions_30d      int := 0;
  qualified_30d     int := 0;
  advocacy_60d      int := 0;
  long_form_30d     int := 0;
  repeat_30d        int := 0;
  inactivity_days   int := 999;
  s5_conditions     int;
BEGIN
  IF p_user_id IS NULL THEN
    RETURN;
  END IF;

  SELECT s.current_state INTO prior_state
    FROM bench_baseline.audience_state s
   WHERE s.user_id = p_user_id;

  WITH windowed AS (
    SELECT e.created_at, e.session_id, e.event_type, e.event_category, e.metadata,
           row_number() OVER (
             PARTITION BY e.session_id, e.event_type, date_trunc('second', e.created_at)
             ORDER BY e.created_at
           ) AS nth_in_second
      FROM public.audience_events e
     WHERE e.user_id = p_user_id
       AND e.created_at >= since_120d
       AND e.created_at <= p_as_of
       AND e.event_category IN
           ('engagement', 'retention', 'subscription', 'advocacy', 'attribution', 'system')
  ),
  kept AS (
    SELECT w.*,
           (w.event_type <> 'content_view'
            OR coalesce(bench_baseline.meta_num(w.metadata, 'duration_seconds'), 0) >= 20
            OR coalesce(bench_baseline.meta_num(w.metadata, 'scroll_depth_percent'), 0) >= 30
           ) AS qualified
      FROM windowed w
     WHERE w.nth_in_second = 1
  )
  SELECT coalesce(sum(
           CASE WHEN NOT k.qualified THEN 0
                ELSE CASE k.event_type
                       WHEN 'content_view' THEN 1
                       WHEN 'scroll_depth_75' THEN 2
                       WHEN 'video_completion_75' THEN 3
                       WHEN 'multi_internal_click' THEN 2
                       WHEN 'long_form_completion' THEN 4
                       WHEN 'repeat_session_30d' THEN 3
                       WHEN 'high_frequency_session' THEN 3
                       WHEN 'email_subscribe' THEN 6
                       WHEN 'asset_download' THEN 4
                       WHEN 'content_share' THEN 5
                       WHEN 'referral_click' THEN 4
                       WHEN 'comment_repeat' THEN 3
                       WHEN 'mention_tag' THEN 3
                       WHEN 'advocacy_repeat' THEN 3
                       ELSE 0
                     END
           END), 0),
         (SELECT count(DISTINCT k2.session_id) FROM kept k2 WHERE k2.created_at >= since_30d),
         (SELECT count(*) FROM kept k2
           WHERE k2.created_at >= since_30d AND k2.event_type = 'content_view' AND k2.qualified),
         (SELECT count(*) FROM kept k2
           WHERE k2.created_at >= since_60d AND k2.event_category = 'advocacy'),
         (SELECT count(*) FROM kept k2
           WHERE k2.created_at >= since_30d AND k2.event_type = 'long_form_completion'),
         (SELECT count(*) FROM kept k2
           WHERE k2.created_at >= since_30d AND k2.event_type = 'repeat_session_30d'),
         (SELECT k2.event_type FROM kept k2 ORDER BY k2.created_at DESC LIMIT 1)
    INTO score, sessions_30d, qualified_30d, advocacy_60d, long_form_30d, repeat_30d, last_type
    FROM kept k;

  IF last_type IS NOT NULL THEN
    SELECT extract(day FROM p_as_of - max(e.created_at))::int INTO inactivity_days
      FROM public.audience_events e
     WHERE e.user_id = p_user_id AND e.created_at <= p_as_of;
  END IF;

  -- Gates, always climbing from S0 (the seed's memoryless model).
  IF EXISTS (SELECT 1 FROM public.audience_events e
              WHERE e.user_id = p_user_id AND e.created_at >= since_7d AND e.created_at <= p_as_of
                AND e.event_type IN ('scroll_depth_75', 'video_completion_75', 'long_form_completion'))
     OR (score >= 5 AND EXISTS (SELECT 1 FROM public.audience_events e
                                 WHERE e.user_id = p_user_id AND e.created_at >= since_7d
                                   AND e.created_at <= p_as_of)) THEN
    new_state := 'S1';
  END IF;

  IF new_state = 'S1'
     AND (EXISTS (SELECT 1 FROM public.audience_events e
                   WHERE e.user_id = p_user_id AND e.created_at >= since_30d
                     AND e.created_at <= p_as_of AND e.event_type = 'repeat_session_30d')
          OR score >= 12
          OR (sessions_30d >= 2 AND qualified_30d >= 3)) THEN
    new_state := 'S2';
  END IF;

  IF new_state = 'S2'
     AND EXISTS (SELECT 1 FROM public.audience_events e
                  WHERE e.user_id = p_user_id AND e.created_at >= since_120d
                    AND e.created_at <= p_as_of
                    AND e.event_type IN ('email_subscribe', 'asset_download')
                    AND coalesce((e.metadata ->> 'consent_recorded')::boolean, false)) THEN
    new_state := 'S3';
  END IF;

  IF new_state = 'S3'
     AND EXISTS (SELECT 1 FROM public.audience_events e
                  WHERE e.user_id = p_user_id AND e.created_at >= since_60d
                    AND e.created_at <= p_as_of
                    AND e.event_type IN ('content_share', 'referral_click', 'comment_repeat',
                                         'mention_tag', 'advocacy_repeat')) THEN
    new_state := 'S4';
  END IF;

  IF new_state = 'S4' THEN
    s5_conditions := (advocacy_60d >= 3)::int + (score >= 35)::int + (repeat_30d >= 2)::int
                     + (long_form_30d >= 1)::int;
    IF s5_conditions >= 2 THEN
      new_state := 'S5';
    END IF;
  END IF;

  -- Retention rules, each applied once, R1 before R2 before R3 (not a cascade).
  IF new_state = 'S3' AND inactivity_days >= 45 THEN
    new_state := 'S2';
  END IF;
  IF new_state = 'S4' AND inactivity_days >= 60 THEN
    new_state := 'S3';
  END IF;
  IF new_state = 'S5' AND inactivity_days >= 75 THEN
    new_state := 'S4';
  END IF;

  INSERT INTO bench_baseline.audience_state AS s
         (user_id, current_state, state_updated_at, engagement_score, last_event_type, metadata)
  VALUES (p_user_id, new_state, p_as_of, score, last_type, '{}'::jsonb)
  ON CONFLICT (user_id) DO UPDATE
     SET current_state = excluded.current_state,
         state_updated_at = excluded.state_updated_at,
         engagement_score = excluded.engagement_score,
         last_event_type = excluded.last_event_type;

  IF prior_state IS DISTINCT FROM new_state THEN
    INSERT INTO bench_baseline.state_log
           (user_id, session_id, event_type, event_category, event_source, metadata)
    VALUES (p_user_id, 'system', 'state_change_logged', 'system', 'derivation_job',
            jsonb_build_object('prior_state', prior_state, 'new_state', new_state,
                               'derived_at', p_as_of,
                               'derived_by', 'bench_derive_audience_state'));
  END IF;
END
$$;

-- The driver a user of the seed runs: one call per user with an event in the lookback window,
-- all in the caller's transaction. p_limit (NULL = every user) times a sample of users.
CREATE OR REPLACE FUNCTION bench_baseline.run_batch(
  p_as_of timestamptz,
  p_lookback interval DEFAULT interval '120 days',
  p_limit int DEFAULT NULL
) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
  target record;
  done int := 0;
BEGIN
  FOR target IN
    SELECT DISTINCT e.user_id
      FROM public.audience_events e
     WHERE e.user_id IS NOT NULL
       AND e.created_at >= p_as_of - p_lookback
       AND e.created_at <= p_as_of
     ORDER BY e.user_id
     LIMIT p_limit
  LOOP
    PERFORM bench_baseline.bench_derive_audience_state(target.user_id, p_as_of);
    done := done + 1;
  END LOOP;
  RETURN done;
END
$$;
