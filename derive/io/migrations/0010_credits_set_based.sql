-- Derived tables keep their referential guarantee without per-row foreign-key checks.
--
-- attribution_credits had four foreign keys (conversion and touchpoint to prospect_touchpoints,
-- user, org) and metric_aggregates two (user, org). Each was checked row by row on insert: about
-- three quarters of the write time of a first attribution run (1.9M credits). Both tables are
-- written only by derive, from rows it read in the same run, so the check at insert guards
-- nothing the job does not already know; what the keys gave that matters is the cascade:
-- deleting a touchpoint, a user or an org removes the derived rows that name it. That guarantee is
-- kept here by statement-level triggers with transition tables: one set-based DELETE per
-- statement, however many rows it deleted (TRUNCATE included). The jobs close the remaining race
-- (a touchpoint deleted between a run's read and its write) themselves: see
-- derive.io.touchpoints.lock_sources and derive.io.metrics.lock_owners.

ALTER TABLE attribution_credits
  DROP CONSTRAINT IF EXISTS attribution_credits_conversion_id_fkey,
  DROP CONSTRAINT IF EXISTS attribution_credits_touchpoint_id_fkey,
  DROP CONSTRAINT IF EXISTS attribution_credits_user_id_fkey,
  DROP CONSTRAINT IF EXISTS attribution_credits_org_id_fkey;
ALTER TABLE metric_aggregates
  DROP CONSTRAINT IF EXISTS metric_aggregates_user_id_fkey,
  DROP CONSTRAINT IF EXISTS metric_aggregates_org_id_fkey;

-- Functions run as their owner (like a foreign key's cascade, which ignores the deleting role's
-- privileges on the referencing table) with a pinned search_path.
CREATE OR REPLACE FUNCTION public.derive_cascade_touchpoints() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    DELETE FROM public.attribution_credits;
  ELSE
    DELETE FROM public.attribution_credits a USING gone g WHERE a.conversion_id = g.id;
    DELETE FROM public.attribution_credits a USING gone g WHERE a.touchpoint_id = g.id;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION public.derive_cascade_users() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    DELETE FROM public.attribution_credits;
    DELETE FROM public.metric_aggregates;
  ELSE
    DELETE FROM public.attribution_credits a USING gone g WHERE a.user_id = g.id;
    DELETE FROM public.metric_aggregates a USING gone g WHERE a.user_id = g.id;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION public.derive_cascade_orgs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF tg_op = 'TRUNCATE' THEN
    DELETE FROM public.attribution_credits WHERE org_id IS NOT NULL;
    DELETE FROM public.metric_aggregates WHERE org_id IS NOT NULL;
  ELSE
    DELETE FROM public.attribution_credits a USING gone g WHERE a.org_id = g.id;
    DELETE FROM public.metric_aggregates a USING gone g WHERE a.org_id = g.id;
  END IF;
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION public.derive_cascade_touchpoints(), public.derive_cascade_users(),
  public.derive_cascade_orgs() FROM PUBLIC;

DROP TRIGGER IF EXISTS derive_cascade_delete ON prospect_touchpoints;
CREATE TRIGGER derive_cascade_delete AFTER DELETE ON prospect_touchpoints
  REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
  EXECUTE FUNCTION public.derive_cascade_touchpoints();
DROP TRIGGER IF EXISTS derive_cascade_truncate ON prospect_touchpoints;
CREATE TRIGGER derive_cascade_truncate AFTER TRUNCATE ON prospect_touchpoints
  FOR EACH STATEMENT EXECUTE FUNCTION public.derive_cascade_touchpoints();

DROP TRIGGER IF EXISTS derive_cascade_delete ON users;
CREATE TRIGGER derive_cascade_delete AFTER DELETE ON users
  REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION public.derive_cascade_users();
DROP TRIGGER IF EXISTS derive_cascade_truncate ON users;
CREATE TRIGGER derive_cascade_truncate AFTER TRUNCATE ON users
  FOR EACH STATEMENT EXECUTE FUNCTION public.derive_cascade_users();

DROP TRIGGER IF EXISTS derive_cascade_delete ON orgs;
CREATE TRIGGER derive_cascade_delete AFTER DELETE ON orgs
  REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION public.derive_cascade_orgs();
DROP TRIGGER IF EXISTS derive_cascade_truncate ON orgs;
CREATE TRIGGER derive_cascade_truncate AFTER TRUNCATE ON orgs
  FOR EACH STATEMENT EXECUTE FUNCTION public.derive_cascade_orgs();
