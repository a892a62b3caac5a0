"""A cursor for the annotator's hot path: fixed SQL text sent as prepared statements.

Why: building a query through the ORM costs more CPU than PostgreSQL spends running it (about a
millisecond per lease query on these machines), and PostgreSQL plans every statement it is sent
as text anew (5 ms for the lease query at a million tasks, against 0.5 ms to run it). The few
statements each next-task and vote request runs are therefore written once, as SQL with
parameters, and sent with server-side binding and ``prepare=True``: psycopg prepares each on the
first use on a connection and reuses it for the life of the connection (the connection pool keeps
connections, and so their prepared statements, across requests), and PostgreSQL plans it once
(``plan_cache_mode=force_generic_plan`` on the connection, histoloop.settings).

Django's query log (``assertNumQueries``, ``CaptureQueriesContext``) still sees these statements,
and database errors still arrive as ``django.db`` exceptions, because the cursor is wrapped the
way Django wraps its own.

``DATABASE_PREPARED=0`` (settings.DATABASE_PREPARED) sends the same SQL unprepared, for a
transaction-mode connection pooler (pgbouncer) that cannot keep statements across transactions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.backends.postgresql.base import ServerBindingCursor


class _PreparingCursor(ServerBindingCursor):
    """Server-side binding; every statement prepared (once per connection: psycopg caches it)."""

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: bool | None = None
    ) -> Any:
        return super().execute(query, params, prepare=settings.DATABASE_PREPARED, binary=binary)

    def _send_query_prepared(self, name: bytes, pgq: Any, *, binary: bool | None = None) -> None:
        # psycopg (3.3) remembers the statement it sent only when it sends its text; Django's query log
        # (and assertNumQueries' messages) read it from there, so remember a prepared one too.
        self._query = pgq
        super()._send_query_prepared(name, pgq, binary=binary)


@contextmanager
def cursor() -> Iterator[Any]:
    """A Django-wrapped cursor on the default connection (inside the caller's transaction, if any)."""
    connection.ensure_connection()
    with connection.wrap_database_errors:
        raw = _PreparingCursor(connection.connection)
    wrapped = connection._prepare_cursor(raw)  # the debug/query-log wrapper Django puts on its own
    try:
        yield wrapped
    finally:
        wrapped.close()


def rows(sql: str, params: Sequence[Any] | dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of a statement that returns rows (a SELECT, or a write with RETURNING)."""
    with cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())
