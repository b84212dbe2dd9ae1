"""The store's tests run on both engines: a DuckDB file, and a fresh database on the session's real PostgreSQL
server (tests/fixtures_pg.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["duckdb", "postgres"])
def location(request, tmp_path) -> str | Path:
    """Where a test's store lives: a DuckDB file, or a fresh PostgreSQL database (same API, same results)."""
    if request.param == "duckdb":
        return tmp_path / "fb.duckdb"
    return request.getfixturevalue("pg_url")
