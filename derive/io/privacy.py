"""SQL of ``derive export`` and ``derive erase``: which rows belong to a person, read or delete them.

Two kinds of person live in the tables (SPEC §1): a *user* id (an audience member in
``audience_events`` / ``audience_state``, and a tenant in seed 002's tables; demo data makes every
audience member a ``users`` row too, so one id covers both) and a tenant's *prospect*. A
:class:`Selection` names a table and the predicate that picks the person's rows in it; export
reads those rows, erase deletes them (in the order listed, children before parents), and the dry
run counts them, so the three can never disagree.

The subject id is a transaction-local setting (``derive.subject``), so no value is ever
interpolated into SQL text; table and column names come from this module and the catalog.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from derive.io.connect import Db
from derive.io.runlog import Run

SUBJECT = "current_setting('derive.subject')::uuid"
SubjectKind = Literal["user", "prospect"]


@dataclass(frozen=True)
class Selection:
    """The rows of one table that are about the subject.

    Attributes:
        where: predicate over the table aliased ``t``.
        erase: ``delete`` the rows, or ``definer``: tables service_role may not write, cleared
            by ``derive_erase_references`` for a running erase (``derivation_runs``: the run
            stays, the id in its ``args.users`` is replaced by ``"erased"`` so the run keeps its
            scope; ``audience_event_changes``: the person's change-set rows go).
        order_by: columns that give the export a stable row order.
        withheld: columns never exported (keys, not data about the person).
        exported_as: column -> SQL expression replacing it in the export.
    """

    table: str
    where: str
    order_by: str
    erase: Literal["delete", "definer"] = "delete"
    withheld: tuple[str, ...] = ()
    exported_as: dict[str, str] = field(default_factory=dict)


# A prospect's touchpoints are the ones naming it and, within the same tenant (the hash is salted
# per tenant), the anonymous ones carrying the same identifier hash: the same person. Written as
# an id list so both halves are index scans (by prospect, by (user_id, identifier_hash)).
_PROSPECT_TOUCHPOINT = f"""t.id IN (
       SELECT p.id FROM prospect_touchpoints p WHERE p.prospect_id = {SUBJECT}
       UNION
       SELECT a.id
         FROM prospect_touchpoints p
         JOIN prospect_touchpoints a
           ON a.user_id = p.user_id AND a.identifier_hash = p.identifier_hash
        WHERE p.prospect_id = {SUBJECT} AND p.identifier_hash IS NOT NULL)"""

#: Rows about a user id, in erase order (children first; audience_state first for the guard).
USER: tuple[Selection, ...] = (
    Selection("audience_state", f"t.user_id = {SUBJECT}", "t.user_id"),
    Selection("audience_events", f"t.user_id = {SUBJECT}", "t.created_at, t.id"),
    Selection("audience_state_history", f"t.user_id = {SUBJECT}", "t.as_of"),
    Selection(
        "attribution_credits",
        f"t.user_id = {SUBJECT}",
        "t.computed_at, t.conversion_id, t.model, t.touchpoint_id",
    ),
    Selection("prospect_touchpoints", f"t.user_id = {SUBJECT}", "t.occurred_at, t.id"),
    # The stored rows (metric_aggregates is a view over them, migration 0012).
    Selection(
        "metric_aggregate_rows", f"t.user_id = {SUBJECT}", "t.metric_kind, t.window_start, t.id"
    ),
    Selection("surface_metrics", f"t.user_id = {SUBJECT}", "t.fetched_at, t.id"),
    Selection(
        "rollup_pending",
        f"t.user_id = {SUBJECT}",
        "t.metric_kind, t.window_start, t.window_end, t.fetched_at",
    ),
    Selection(
        "ingestion_session_steps",
        f"t.session_id IN (SELECT s.id FROM ingestion_sessions s WHERE s.user_id = {SUBJECT})",
        "t.session_id, t.ordinal",
    ),
    Selection("ingestion_sessions", f"t.user_id = {SUBJECT}", "t.started_at, t.id"),
    Selection("prospects", f"t.user_id = {SUBJECT}", "t.id"),
    Selection("users", f"t.id = {SUBJECT}", "t.id", withheld=("attribution_salt",)),
    Selection("derive_rejected_users", f"t.user_id = {SUBJECT}", "t.user_id"),
    # Requests: service_role may only update them (migration 0022 adds them to the definer).
    Selection("derive_requests", f"t.user_id = {SUBJECT}", "t.id", erase="definer"),
    # After the events: deleting them records the person in the change set once more.
    Selection("audience_event_changes", f"t.user_id = {SUBJECT}", "t.changed_at", erase="definer"),
    # Runs given the id with --user: the run row stays (it is the job's log), the id goes.
    Selection(
        "derivation_runs",
        f"t.args -> 'users' ? ({SUBJECT})::text",
        "t.started_at, t.run_id",
        erase="definer",
        exported_as={
            "args": f"jsonb_set(t.args, '{{users}}', jsonb_build_array(({SUBJECT})::text))"
        },
    ),
)

#: Rows about one prospect of a tenant, in erase order.
PROSPECT: tuple[Selection, ...] = (
    # Credits carry their conversion's prospect; only touchpoints of the same (user, prospect)
    # earn credit, so that is every credit about the prospect.
    Selection(
        "attribution_credits",
        f"t.prospect_id = {SUBJECT}",
        "t.computed_at, t.conversion_id, t.model, t.touchpoint_id",
    ),
    Selection("prospect_touchpoints", _PROSPECT_TOUCHPOINT, "t.occurred_at, t.id"),
    Selection("prospects", f"t.id = {SUBJECT}", "t.id"),
)

SELECTIONS: dict[SubjectKind, tuple[Selection, ...]] = {"user": USER, "prospect": PROSPECT}

# Types Arrow and Parquet carry as they are; every other column is exported as its text form
# (uuid, json/jsonb, numeric, interval, enums), which loses nothing.
_NATIVE = {
    "smallint", "integer", "bigint", "real", "double precision", "boolean", "text",
    "timestamp with time zone", "timestamp without time zone", "date", "bytea", "text[]",
}  # fmt: skip

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, NULL)
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def begin_subject(db: Db, *, subject: str, read_only: bool) -> str:
    """Start the transaction for one subject; return the role its reads run as.

    ``service_role`` when the connecting role may switch to it (the job's own connection), else
    the connecting role itself, so a tenant's connection sees only what its row-level security
    policies show it.
    """
    db.rollback()
    if read_only:
        db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    db.lift_timeouts()
    if db.fetch_value("SELECT pg_has_role(current_user, 'service_role', 'MEMBER')"):
        db.execute('SET LOCAL ROLE "service_role"')
    db.set_local(subject=subject)
    return str(db.fetch_value("SELECT current_user"))


def readable(db: Db, table: str) -> bool | None:
    """Whether the current role may read ``table`` (``None``: the table does not exist)."""
    row = db.fetch_all(
        "SELECT to_regclass($1) IS NOT NULL,"
        " CASE WHEN to_regclass($1) IS NOT NULL"
        " THEN has_table_privilege(current_user, to_regclass($1), 'SELECT') END",
        (table,),
    )[0]
    return None if not row[0] else bool(row[1])


def count_rows(db: Db, selection: Selection) -> int:
    """How many rows of the table are about the subject."""
    return int(db.fetch_value(f"SELECT count(*) FROM {selection.table} t WHERE {selection.where}"))


def portable_columns(
    db: Db,
    table: str,
    *,
    alias: str = "t",
    withheld: tuple[str, ...] = (),
    replaced: dict[str, str] | None = None,
) -> str:
    """A select list of every column of ``table`` in types Arrow and Parquet carry losslessly.

    Args:
        replaced: column -> SQL expression to export instead (its text form).
    """
    replaced = replaced or {}
    parts = []
    for name, type_name in db.fetch_all(_COLUMNS, (table,)):
        if name in withheld:
            continue
        expression = replaced.get(name, f"{alias}.{_ident(name)}")
        if name in replaced or type_name not in _NATIVE:
            expression = f"({expression})::text"
        parts.append(f"{expression} AS {_ident(name)}")
    return ", ".join(parts)


def _select_list(db: Db, selection: Selection, *, typed: bool) -> str:
    if typed:
        return portable_columns(
            db, selection.table, withheld=selection.withheld, replaced=selection.exported_as
        )
    return ", ".join(
        f"{selection.exported_as.get(name, f't.{_ident(name)}')} AS {_ident(name)}"
        for name, _ in db.fetch_all(_COLUMNS, (selection.table,))
        if name not in selection.withheld
    )


def read_rows(db: Db, selection: Selection, *, typed: bool) -> pa.Table:
    """The subject's rows of one table.

    Args:
        typed: one Arrow column per table column (for Parquet); otherwise one ``line`` column
            holding each row as PostgreSQL's own JSON rendering (for JSON lines).
    """
    columns = _select_list(db, selection, typed=typed)
    inner = f"SELECT {columns} FROM {selection.table} t WHERE {selection.where}"
    if typed:
        sql = f"{inner} ORDER BY {selection.order_by}"
    else:
        sql = f"SELECT row_to_json(x)::text AS line FROM ({inner} ORDER BY {selection.order_by}) x"
    return db.fetch_arrow(sql)


def database_time(db: Db) -> str:
    """The transaction's timestamp as ISO-8601 (the snapshot's time)."""
    return str(db.fetch_value("SELECT to_json(now())::text")).strip('"')


def _count(db: Db, sql: str) -> int:
    return int(db.fetch_value(f"WITH changed AS ({sql} RETURNING 1) SELECT count(*) FROM changed"))


# Touchpoints of others may point at the subject's (no ON DELETE action on that reference).
_UNLINK_TOUCHPOINTS = """
UPDATE prospect_touchpoints o
   SET attributed_to_touchpoint_id = NULL
 WHERE o.attributed_to_touchpoint_id IN (SELECT t.id FROM prospect_touchpoints t WHERE """

_ERASE_REFERENCES = f"SELECT derive_erase_references($1::uuid, $2, ({SUBJECT}), $3)"

_SUBJECT_ERASED = """
INSERT INTO audience_events (user_id, event_type, event_category, event_source, metadata)
VALUES (NULL, 'subject_erased', 'system', 'derive',
        jsonb_build_object('subject', $1::text,
                           'tables', $2::jsonb,
                           'rows', $3::bigint,
                           'erased_at', now(),
                           'run_id', current_setting('derive.run_id'),
                           'derived_by', $4::text))
"""


def delete_subject(
    db: Db, *, kind: SubjectKind, subject: str, run: Run, derived_by: str
) -> dict[str, int]:
    """Delete (or scrub) every row about the subject in ONE transaction; return rows per table.

    The transaction runs as ``service_role`` and names the erase's running run (the
    audience_state guard lets a running job's transaction through); it ends with one
    ``subject_erased`` system event that holds only table names, counts, the time and the run id,
    and finishes the run in the same commit (a crash after it cannot leave a run that wrote
    audience_state unfinished, which ``derive status`` would flag). A crash at any point leaves
    every row in place.
    """
    counts: dict[str, int] = {}
    with db.transaction():
        begin_subject(db, subject=subject, read_only=False)
        run.mark(db)
        for selection in SELECTIONS[kind]:
            if readable(db, selection.table) is None:
                continue
            if selection.table == "prospect_touchpoints":
                db.execute(f"{_UNLINK_TOUCHPOINTS}{selection.where})")
            if selection.erase == "definer":
                counts[selection.table] = int(
                    db.fetch_value(_ERASE_REFERENCES, (run.run_id, run.token, selection.table))
                )
            else:
                counts[selection.table] = _count(
                    db, f"DELETE FROM {selection.table} t WHERE {selection.where}"
                )
        total = sum(counts.values())
        if total:
            db.execute(
                _SUBJECT_ERASED,
                (kind, json.dumps({k: v for k, v in counts.items() if v}), total, derived_by),
            )
        run.counts.update(
            {"subject": kind, "rows": total, "tables": {k: v for k, v in counts.items() if v}}
        )
        run.finish_in(db)
    return counts
