"""PostgreSQL advisory locks for work that several worker processes, on several hosts, may attempt at once.

Why PostgreSQL rather than a Redis lock: every worker already holds a database connection, and PostgreSQL
drops a session's advisory locks the moment that session ends, so a worker killed with SIGKILL frees its
locks at once (its socket closes; its server backend exits), with no expiry to tune. A Redis lock needs a
TTL that outlasts the longest shard (or a live worker loses it mid-write) and then keeps a dead worker's
shard blocked for as long. Locks are session-level (not transaction-level), so they hold across the
autocommit queries a shard makes, and are always released in ``finally``.

A key is 64 bits of a hash of its parts: two names colliding only serialise two pieces of work, never
let two holders in at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from django.db import connection


def lock_key(*parts: object) -> int:
    """A signed 64-bit advisory lock key naming ``parts``."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def try_acquire(key: int) -> bool:
    """Take the lock if no other session holds it; never waits."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [key])
        row = cursor.fetchone()
    return bool(row and row[0])


def release(key: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


@contextmanager
def held(key: int) -> Iterator[None]:
    """Hold the lock for the block, waiting for another holder to let go (only for short critical sections)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [key])
    try:
        yield
    finally:
        release(key)


def slide_file_lock(model_id: str, slide_key: str) -> AbstractContextManager[None]:
    """The lock every process of the platform holds while it rewrites one slide's embedding file
    (``EmbeddingStore.write_lock``, given by ``learner.embedding.store_for``)."""
    return held(lock_key("embedding-file", model_id, slide_key))
