"""Postgres patterns: schema, COPY into UNLOGGED staging, idempotent promotion, view refresh."""
