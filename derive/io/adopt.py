"""SQL of ``derive db adopt``: give pre-existing states an audit trail, set-based, once."""

from __future__ import annotations

from derive.io.connect import Db
from derive.io.jsonsql import uuid_or_null
from derive.io.runlog import Run

_ADOPT = f"""
WITH orphans AS (
  SELECT s.user_id, s.current_state
    FROM audience_state s
    LEFT JOIN audience_events a
           ON a.id = {uuid_or_null("s.metadata ->> 'last_audit_id'")}
          AND a.event_category = 'system'
          AND a.event_type IN ('state_change_logged', 'state_adopted')
   WHERE a.id IS NULL
      OR a.user_id IS DISTINCT FROM s.user_id
      OR a.metadata ->> 'new_state' IS DISTINCT FROM s.current_state
), logged AS (
  INSERT INTO audience_events (id, user_id, event_type, event_category, event_source, metadata)
  SELECT md5(current_setting('derive.run_id') || ':' || o.user_id::text)::uuid,
         o.user_id, 'state_adopted', 'system', 'derive',
         jsonb_build_object(
           'prior_state', NULL,
           'new_state', o.current_state,
           'rule_trigger', jsonb_build_object('rule', 'adopted'),
           'derived_at', current_setting('derive.as_of')::timestamptz,
           'derived_by', current_setting('derive.derived_by'),
           'run_id', current_setting('derive.run_id'))
    FROM orphans o
  RETURNING id, user_id
), pointed AS (
  UPDATE audience_state s
     SET metadata = s.metadata || jsonb_build_object('last_audit_id', l.id::text,
                                                     'adopted_by_run', current_setting('derive.run_id')),
         updated_at = now()
    FROM logged l
   WHERE s.user_id = l.user_id
  RETURNING 1
)
SELECT count(*) FROM pointed
"""


def adopt_states(db: Db, *, run: Run, as_of: str, derived_by: str) -> int:
    """Write one ``state_adopted`` row per state without a consistent audit trail; return how many.

    The run is finished inside the same transaction, so the adoption and its run row commit together.
    """
    with db.transaction(role="service_role"):
        run.mark(db)
        db.set_local(as_of=as_of, derived_by=derived_by)
        adopted = int(db.fetch_value(_ADOPT))
        run.counts["states_adopted"] = adopted
        run.finish_in(db)
    return adopted
