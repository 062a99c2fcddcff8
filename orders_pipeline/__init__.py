"""Orders pipeline: Redis queue → Polars → Postgres staging → orders → views, run by Dagster.

A regular package (not a namespace package) so that `importlib.resources.files` can read the
DDL it ships in `orders_pipeline/sql/` from any install: editable, wheel or zip.
"""
