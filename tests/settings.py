"""Settings for the test suite: histoloop.settings as a developer runs it, with DEBUG=1.

DEBUG is off by default (histoloop.settings). Tests still run with Django's DEBUG=False (the test
runner forces it), but the settings that follow DEBUG at import time (the development secret key,
static files served from the source folders without a collectstatic manifest) are the developer's.
It is set in the environment, so the servers and workers the tests start see the same.
"""

import os

os.environ.setdefault("DEBUG", "1")

from histoloop.settings import *  # noqa: F403
