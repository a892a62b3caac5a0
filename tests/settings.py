"""Settings for the test suite: histoloop.settings as a developer runs it, with DEBUG=1.

DEBUG is off by default (histoloop.settings). Tests still run with Django's DEBUG=False (the test
runner forces it), but the settings that follow DEBUG at import time (the development secret key,
static files served from the source folders without a collectstatic manifest) are the developer's.
It is set in the environment, so the servers and workers the tests start see the same.
"""

import os

os.environ.setdefault("DEBUG", "1")

from histoloop.settings import *  # noqa: F403

# Background embedding after ingest is off in the suite: the many tests that ingest slides would otherwise
# queue shards that the session's worker embeds while later tests run (and while their database is flushed).
# tests/integration/test_embedding_shards.py switches it on where it is the subject.
LEARNER = {**LEARNER, "BACKGROUND_EMBEDDING": False}  # noqa: F405

# A test that waits on a lock for minutes has found a bug (a connection left in a transaction, a worker
# holding rows): the statement fails with "canceling statement due to lock timeout" instead of holding the
# run until CI's limit (the flush between transactional tests takes every table's lock). The servers and
# workers the tests start read these settings too.
_test_options = DATABASES["default"].setdefault("OPTIONS", {})  # noqa: F405
_test_options["options"] = f"{_test_options.get('options', '')} -c lock_timeout=120s".strip()
