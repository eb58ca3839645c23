"""``derive db adopt``: take over an audience_state written by an older system (SPEC §2.3).

Every stored state whose audit trail is missing or disagrees gets one ``state_adopted`` audit row and
its audit pointer, so the ``state_jump`` fail-safe accepts it from then on. Running it again finds
nothing left to adopt. It shares the derivation's lock, so it never interleaves with a run.
"""

from __future__ import annotations

from datetime import datetime

from derive import __version__
from derive.io.adopt import adopt_states
from derive.io.connect import Db
from derive.io.runlog import job_run
from derive.jobs.derivation import JOB as DERIVE_JOB


def adopt(db: Db, *, as_of: datetime) -> int:
    """Adopt every unaudited state; return how many were adopted."""
    with job_run(db, job="adopt", as_of=as_of, lock=DERIVE_JOB) as run, run.phase("write"):
        adopted = adopt_states(
            db, run=run, as_of=as_of.isoformat(), derived_by=f"derive {__version__}"
        )
    return adopted
