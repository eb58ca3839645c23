"""Forward-only, numbered SQL migrations and the schema check behind ``derive db check``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from derive.errors import SchemaError
from derive.io.connect import Db
from derive.io.sqlscript import split_statements

# pg_advisory_xact_lock key of the migration step (one migrator per database at a time).
_MIGRATION_LOCK = 0x64657276  # "derv"

PROTECTED_TABLES = ("audience_state", "derivation_runs", "metric_aggregates", "attribution_credits")
RLS_TABLES = (
    "audience_events",
    "audience_state",
    "derivation_runs",
    "users",
    "orgs",
    "prospects",
    "surface_metrics",
    "metric_aggregates",
    "prospect_touchpoints",
    "attribution_credits",
    "ingestion_sessions",
    "ingestion_session_steps",
    "audience_state_history",
    "audience_state_history_steps",
    "rollup_pending",
)
TENANT_POLICIES = (
    "audience_state",
    "audience_events",
    "surface_metrics",
    "metric_aggregates",
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
    return done


def _protect_migration_table(db: Db) -> None:
    with db.transaction():
        db.execute("ALTER TABLE derive_migrations ENABLE ROW LEVEL SECURITY")
        db.execute("ALTER TABLE derive_migrations FORCE ROW LEVEL SECURITY")
        db.execute("REVOKE ALL ON derive_migrations FROM PUBLIC")
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
    """One line of ``derive db check``."""

    name: str
    ok: bool
    detail: str = ""


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
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'"
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
    for table in PROTECTED_TABLES:
        if table not in flags:
            continue
        for role in ("anon", "authenticated"):
            granted = [
                priv
                for priv in ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
                if db.fetch_value("SELECT has_table_privilege($1, $2, $3)", (role, table, priv))
            ]
            results.append(
                Check(
                    f"{role} cannot write {table}",
                    not granted,
                    f"holds {', '.join(granted)}" if granted else "",
                )
            )
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
    for trigger in ("audience_state_guard", "audience_state_guard_truncate"):
        state = triggers.get(trigger)
        results.append(
            Check(
                f"guard trigger {trigger} enabled",
                state == "O",
                "missing" if state is None else ("" if state == "O" else f"tgenabled={state}"),
            )
        )
    db.rollback()
    return results


def require_schema(db: Db) -> None:
    """Raise :class:`SchemaError` listing every failed check."""
    failed = [c for c in check(db) if not c.ok]
    if failed:
        raise SchemaError("schema check failed: " + "; ".join(c.name for c in failed))
