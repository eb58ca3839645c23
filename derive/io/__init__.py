"""The only package that talks to PostgreSQL: connections, Arrow reads, ADBC writes, migrations."""
