"""A PostgreSQL database of a test's own on the cluster's server, dropped afterwards, so
that ledgers, checkpoints and audit chains hold exactly what the test wrote."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg


@contextlib.contextmanager
def own_database(postgres_dsn: str, prefix: str) -> Iterator[str]:
    """Create `<prefix>_<random>` and yield its DSN; drop it (connections and all) after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
