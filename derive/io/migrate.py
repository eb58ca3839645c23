"""Forward-only, numbered SQL migrations and the schema check behind ``derive db check``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files

from derive.errors import SchemaError
from derive.io.connect import Db
from derive.io.sqlscript import split_statements

# pg_advisory_xact_lock key of the migration step (one migrator per database at a time).
_MIGRATION_LOCK = 0x64657276  # "derv"

#: metric_aggregates is a view over metric_aggregate_rows (migration 0012): both are checked.
PROTECTED_TABLES = (
    "audience_state",
    "derivation_runs",
    "metric_aggregates",
    "metric_aggregate_rows",
    "attribution_credits",
)
RLS_TABLES = (
    "audience_events",
    "audience_state",
    "derivation_runs",
    "users",
    "orgs",
    "prospects",
    "surface_metrics",
    "metric_aggregate_rows",
    "prospect_touchpoints",
    "attribution_credits",
    "ingestion_sessions",
    "ingestion_session_steps",
    "audience_state_history",
    "audience_state_history_steps",
    "rollup_pending",
    "audience_event_changes",
    "derive_migrations",
    "derive_rejected_users",
    "derive_requests",
    "derive_run_writes",
    "rollup_clock",
    "prospect_touchpoint_changes",
    "attribution_run_surfaces",
)
TENANT_POLICIES = (
    "audience_state",
    "audience_events",
    "surface_metrics",
    "metric_aggregate_rows",
    "prospect_touchpoints",
    "attribution_credits",
    "ingestion_sessions",
    "ingestion_session_steps",
)
ROLES = ("service_role", "anon", "authenticated")


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The packaged migrations, in order."""
    folder = files("derive.io").joinpath("migrations")
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            out.append(Migration(version, rest.removesuffix(".sql"), entry.read_text()))
    return out


_CREATE_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+ON\b"
    r"|DROP\s+INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(\w+)",
    re.IGNORECASE,
)


def migration_indexes() -> dict[str, str]:
    """index name -> the migration file that creates it, for every index the migrations leave.

    Read from the packaged SQL in order (an index a later migration drops is not expected);
    comments are skipped.
    """
    indexes: dict[str, str] = {}
    for migration in available():
        text = re.sub(r"--[^\n]*", "", migration.sql)
        for match in _CREATE_INDEX.finditer(text):
            created, dropped = match.group(1), match.group(2)
            if created:
                indexes[created.lower()] = f"{migration.version}_{migration.name}.sql"
            else:
                indexes.pop(dropped.lower(), None)
    return indexes


def applied(db: Db) -> dict[str, str]:
    """version -> checksum of the migrations recorded in ``derive_migrations`` (empty if none)."""
    exists = db.fetch_value("SELECT to_regclass('derive_migrations') IS NOT NULL")
    db.rollback()
    if not exists:
        return {}
    rows = db.fetch_all("SELECT version, checksum FROM derive_migrations")
    db.rollback()
    return {str(v): str(c) for v, c in rows}


def migrate(db: Db) -> list[str]:
    """Apply every missing migration, each in its own transaction; return the versions applied.

    Idempotent: a second call applies nothing and changes nothing.
    """
    done: list[str] = []
    for migration in available():
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock($1)", (_MIGRATION_LOCK,))
            db.execute(
                "CREATE TABLE IF NOT EXISTS derive_migrations ("
                " version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            if db.fetch_value(
                "SELECT 1 FROM derive_migrations WHERE version = $1", (migration.version,)
            ):
                continue
            for statement in split_statements(migration.sql):
                db.execute(statement)
            db.execute(
                "INSERT INTO derive_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                (migration.version, migration.name, migration.checksum),
            )
            done.append(migration.version)
    _protect_migration_table(db)
    _settle_grants(db)
    return done


def _settle_grants(db: Db) -> None:
    """Take back what default privileges granted on derive's objects (migrations 0051, 0013).

    Runs after every migration run, so objects of later migrations are settled too, and a
    database whose admin roles grant ALL on new objects (Supabase) ends with derive's own grants.
    """
    with db.transaction():
        for function in ("derive_settle_grants", "derive_settle_rollup_grants"):
            if db.fetch_value("SELECT to_regprocedure($1) IS NOT NULL", (f"{function}()",)):
                db.execute(f"SELECT {function}()")


def _protect_migration_table(db: Db) -> None:
    with db.transaction():
        db.execute("ALTER TABLE derive_migrations ENABLE ROW LEVEL SECURITY")
        db.execute("ALTER TABLE derive_migrations FORCE ROW LEVEL SECURITY")
        db.execute("REVOKE ALL ON derive_migrations FROM PUBLIC")
        # Default privileges (Supabase) may have granted it to the API roles; only derive writes it.
        for role in ROLES:
            if db.fetch_value("SELECT 1 FROM pg_roles WHERE rolname = $1", (role,)):
                db.execute(f'REVOKE ALL ON derive_migrations FROM "{role}"')
        # FORCE applies to the owner too: the migrating role keeps full access, and whoever is
        # granted SELECT may read the recorded versions.
        db.execute("DROP POLICY IF EXISTS derive_owner_all ON derive_migrations")
        owner = db.fetch_value("SELECT quote_ident(current_user)")
        db.execute(
            f"CREATE POLICY derive_owner_all ON derive_migrations FOR ALL TO {owner}"
            " USING (true) WITH CHECK (true)"
        )
        db.execute("DROP POLICY IF EXISTS derive_read ON derive_migrations")
        db.execute("CREATE POLICY derive_read ON derive_migrations FOR SELECT USING (true)")


def ensure_migrated(db: Db, *, fix: str = "derive db migrate") -> None:
    """Raise :class:`SchemaError` unless every packaged migration is applied.

    Args:
        db: the database to check.
        fix: the command that migrates it, quoted in the message.
    """
    done = applied(db)
    missing = [m.version for m in available() if m.version not in done]
    if missing:
        never = " (it was never migrated)" if not done else ""
        raise SchemaError(
            f"database {db.label} lacks migrations {', '.join(missing)}{never}: run `{fix}`"
        )


@dataclass(frozen=True)
class Check:
    """One line of ``derive db check``.

    ``warn`` marks a passing line worth reading: a setting of the database (Supabase's default
    privileges, a role with BYPASSRLS) that derive's own grants and guard already answer.
    """

    name: str
    ok: bool
    detail: str = ""
    warn: bool = False


_WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
_CLIENTS = ("anon", "authenticated")


def check(db: Db) -> list[Check]:
    """Verify migrations, tables, RLS flags, grants, tenant policies and the write guard."""
    results: list[Check] = []
    have = applied(db)
    for migration in available():
        recorded = have.get(migration.version)
        results.append(
            Check(
                f"migration {migration.version}_{migration.name}",
                recorded == migration.checksum,
                "missing: run `derive db migrate`"
                if recorded is None
                else (
                    "" if recorded == migration.checksum else "applied file differs from package"
                ),
            )
        )
    for role in ROLES:
        ok = bool(db.fetch_value("SELECT 1 FROM pg_roles WHERE rolname = $1", (role,)))
        results.append(Check(f"role {role} exists", ok))
    flags = {
        str(name): (bool(rls), bool(force))
        for name, rls, force in db.fetch_all(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'v')"
        )
    }
    for table in RLS_TABLES:
        if table not in flags:
            results.append(
                Check(f"table {table} exists", False, "missing: run `derive db migrate`")
            )
            continue
        rls, force = flags[table]
        results.append(
            Check(
                f"RLS enabled and forced on {table}",
                rls and force,
                "" if rls and force else f"enabled={rls} forced={force}",
            )
        )
    for table in RLS_TABLES:
        if table not in flags:
            continue
        for role in _CLIENTS:
            granted = [
                priv
                for priv in _WRITES
                if db.fetch_value("SELECT has_table_privilege($1, $2, $3)", (role, table, priv))
            ]
            if granted or table in PROTECTED_TABLES:  # one line per table only where it matters
                results.append(
                    Check(
                        f"{role} cannot write {table}",
                        not granted,
                        f"holds {', '.join(granted)}: run `derive db migrate` (it revokes what"
                        " default privileges or a manual GRANT gave)"
                        if granted
                        else "",
                    )
                )
    results.extend(_function_checks(db))
    results.extend(_index_checks(db))
    policies = {
        str(t)
        for (t,) in db.fetch_all(
            "SELECT tablename FROM pg_policies WHERE policyname = 'tenant_isolation'"
            " AND schemaname = current_schema()"
        )
    }
    for table in TENANT_POLICIES:
        results.append(Check(f"tenant_isolation policy on {table}", table in policies))
    triggers = (
        {
            str(name): str(enabled)
            for name, enabled in db.fetch_all(
                "SELECT tgname, tgenabled FROM pg_trigger"
                " WHERE tgrelid = to_regclass('audience_state') AND NOT tgisinternal"
            )
        }
        if "audience_state" in flags
        else {}
    )
    guarded = True
    for trigger in ("audience_state_guard", "audience_state_guard_truncate"):
        state = triggers.get(trigger)
        guarded = guarded and state == "O"
        results.append(
            Check(
                f"guard trigger {trigger} enabled",
                state == "O",
                "missing" if state is None else ("" if state == "O" else f"tgenabled={state}"),
            )
        )
    present = [t for t in RLS_TABLES if t in flags]
    results.extend(_bypassrls_checks(db, present, guarded=guarded))
    results.extend(_default_privilege_checks(db))
    db.rollback()
    return results


def _index_checks(db: Db) -> list[Check]:
    """Every index the migrations create exists and is valid (the reads' plans depend on them).

    A ``CREATE INDEX CONCURRENTLY`` that failed leaves an invalid index that no query uses; an
    index dropped after its migration ran is not brought back by ``derive db migrate``.
    """
    found = {
        str(name): bool(valid)
        for name, valid in db.fetch_all(
            "SELECT c.relname, i.indisvalid AND i.indisready FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relnamespace = current_schema()::regnamespace"
        )
    }
    results = []
    for name, migration in sorted(migration_indexes().items()):
        valid = found.get(name)
        source = f"derive/io/migrations/{migration}"
        if valid is None:
            detail = (
                f"missing: create it as {source} does"
                " (`derive db migrate` does not run an applied migration again)"
            )
        elif not valid:
            detail = (
                "invalid (a failed CREATE INDEX CONCURRENTLY?): drop it and create it again"
                f" as {source} does"
            )
        else:
            detail = ""
        results.append(Check(f"index {name}", valid is True, detail))
    return results


def _function_checks(db: Db) -> list[Check]:
    """The client roles may execute none of derive's definer functions (they write the run log)."""
    results = []
    for role in _CLIENTS:
        callable_ = [
            str(name)
            for (name,) in db.fetch_all(
                "SELECT p.proname FROM pg_proc p"
                " WHERE p.pronamespace = current_schema()::regnamespace AND p.prosecdef"
                "   AND (p.proname LIKE 'derive\\_%' OR p.proname = 'run_audience_derivation_batch')"
                "   AND has_function_privilege($1, p.oid, 'EXECUTE') ORDER BY 1",
                (role,),
            )
        ]
        results.append(
            Check(
                f"{role} cannot execute derive's definer functions",
                not callable_,
                f"may execute {', '.join(sorted(set(callable_)))}: run `derive db migrate`"
                if callable_
                else "",
            )
        )
    return results


def _bypassrls_checks(db: Db, tables: list[str], *, guarded: bool) -> list[Check]:
    """Roles that bypass RLS: fatal for the client roles, a warning for the others that can write.

    BYPASSRLS skips policies, not triggers: the guard still rejects every write to audience_state
    outside a derive run. The other tables have no such guard; only grants limit such a role.
    """
    results = []
    for role in _CLIENTS:
        bypass = db.fetch_value(
            "SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = $1", (role,)
        )
        results.append(
            Check(
                f"{role} is bound by RLS",
                not bypass,
                "it has BYPASSRLS: tenant policies do not limit what it reads;"
                f" ALTER ROLE {role} NOBYPASSRLS"
                if bypass
                else "",
            )
        )
    rows = db.fetch_all(
        "SELECT r.rolname, array_agg(t.name ORDER BY t.name),"
        "       (SELECT string_agg(m.rolname, ', ' ORDER BY m.rolname) FROM pg_auth_members a"
        "          JOIN pg_roles m ON m.oid = a.member WHERE a.roleid = r.oid)"
        "  FROM pg_roles r CROSS JOIN unnest($1::text[]) AS t(name)"
        " WHERE r.rolbypassrls AND NOT r.rolsuper AND r.rolname NOT IN ('anon', 'authenticated')"
        "   AND (has_table_privilege(r.oid, t.name, 'INSERT')"
        "        OR has_table_privilege(r.oid, t.name, 'UPDATE')"
        "        OR has_table_privilege(r.oid, t.name, 'DELETE')"
        "        OR has_table_privilege(r.oid, t.name, 'TRUNCATE'))"
        " GROUP BY r.oid, r.rolname ORDER BY r.rolname",
        ("{" + ",".join(tables) + "}",),
    )
    for role, writable, members in rows:
        names = list(writable)
        others = [t for t in names if t != "audience_state"]
        parts = []
        if "audience_state" in names:
            parts.append(
                "audience_state: the guard trigger still rejects its writes outside a derive run"
                if guarded
                else "audience_state: the guard trigger is missing or disabled, nothing stops it"
            )
        if others:
            parts.append(
                f"{', '.join(others)}: no policy binds it there, only its grants"
                " (keep its credentials server-side)"
            )
        if members:
            parts.append(f"members that can SET ROLE to it: {members}")
        results.append(
            Check(
                f"{role} bypasses RLS and can write derived tables",
                guarded or "audience_state" not in names,
                "; ".join(parts),
                warn=True,
            )
        )
    return results


def _default_privilege_checks(db: Db) -> list[Check]:
    """Default privileges of the roles that own derive's tables, granting clients on new objects.

    They would reach every table a later migration creates; ``derive db migrate`` takes them back
    on derive's objects (:func:`_settle_grants`), so they are a warning, not a failure. The grants
    on the existing tables are checked above.
    """
    rows = db.fetch_all(
        "SELECT r.rolname, coalesce(n.nspname, '(all schemas)'), d.defaclobjtype,"
        "       string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'"
        "                  ELSE a.grantee::regrole::text END, ', '),"
        "       string_agg(DISTINCT a.privilege_type, ', ')"
        "  FROM pg_default_acl d JOIN pg_roles r ON r.oid = d.defaclrole"
        "  LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace"
        "  CROSS JOIN aclexplode(d.defaclacl) a"
        " WHERE (d.defaclnamespace = 0 OR d.defaclnamespace = current_schema()::regnamespace)"
        "   AND d.defaclobjtype IN ('r', 'f', 'S')"
        "   AND (a.grantee = 0 OR a.grantee IN (SELECT oid FROM pg_roles"
        "                                       WHERE rolname IN ('anon', 'authenticated')))"
        "   AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'EXECUTE', 'USAGE')"
        "   AND NOT (a.grantee = 0 AND a.privilege_type = 'EXECUTE')"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    kinds = {"r": "tables", "f": "functions", "S": "sequences"}
    if not rows:
        return [Check("no default privileges grant clients derive's new objects", True)]
    return [
        Check(
            f"default privileges of {role} in {schema} grant {kinds[str(kind)]} to {grantees}",
            True,
            f"{privileges} on every new {kinds[str(kind)][:-1]}; derive db migrate revokes them"
            " from derive's own objects (checked above), other objects created by"
            f" {role} keep them",
            warn=True,
        )
        for role, schema, kind, grantees, privileges in rows
    ]


def require_schema(db: Db) -> None:
    """Raise :class:`SchemaError` listing every failed check."""
    failed = [c for c in check(db) if not c.ok]
    if failed:
        raise SchemaError("schema check failed: " + "; ".join(c.name for c in failed))
