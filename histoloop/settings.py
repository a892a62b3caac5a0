"""One settings module, driven by environment variables.

Every value a deployment changes comes from the environment; the defaults are for a
developer's machine. Without ``DATABASE_URL`` / ``REDIS_URL`` the embedded PostgreSQL and Redis
(``histoloop.embedded``) are started under ``var/`` and their URLs exported to child processes.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Off unless asked for: DEBUG=1 shows tracebacks to whoever triggers an error. The test suite
# (tests/settings.py) and developers ask for it; `make demo` runs with it off.
DEBUG = env_bool("DEBUG", False)
_INSECURE_KEY = "django-insecure-histoloop-development-key-change-me"
SECRET_KEY = os.environ.get("SECRET_KEY", _INSECURE_KEY if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY must be set when DEBUG=0. Set it (a long random string), or DEBUG=1 on a developer's machine."
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "http://127.0.0.1:8000,http://localhost:8000")

INSTALLED_APPS = [
    "daphne",  # `manage.py runserver` serves ASGI (websockets) in development; production: histoloop.serve
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "channels",
    "axes",
    "csp",
    "annotations",
    "learner",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a lockout raised during authentication into its page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "histoloop.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "histoloop.asgi.application"

if not (os.environ.get("DATABASE_URL") and os.environ.get("REDIS_URL")):
    # No servers given: start (or reuse) the embedded PostgreSQL and Redis under var/.
    from histoloop import embedded

    embedded.ensure_environment()
_database_url = os.environ["DATABASE_URL"]
DATABASES = {"default": dj_database_url.parse(_database_url, conn_max_age=0)}
# psycopg's connection pool: a request borrows an open connection instead of connecting anew
# (about 8 ms saved per request on loopback). Each server process and worker has its own pool;
# DATABASE_POOL_SIZE bounds it. DATABASE_POOL=0 turns it off (one connection per request).
if env_bool("DATABASE_POOL", True):
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": int(os.environ.get("DATABASE_POOL_SIZE", "16")),
        "timeout": 20,
    }
# The annotator's hot path (annotations.prepared) sends its few statements prepared, and asks
# PostgreSQL to keep one plan per statement (force_generic_plan) instead of planning it again with each
# call's values: planning the lease cost more than running it (1.2 ms against 0.4 ms; 5 ms at a
# million tasks), and its generic plan walks the same partial index. The ORM's queries are never
# prepared (client-side binding), so the setting changes nothing for them. DATABASE_PREPARED=0 for a
# transaction-mode pooler (pgbouncer) that cannot keep prepared statements.
# Django turns psycopg's statement preparation off unless OPTIONS gives a prepare_threshold; a
# threshold no query reaches prepares only what asks for it (prepare=True), i.e. only those statements.
DATABASE_PREPARED = env_bool("DATABASE_PREPARED", True)
if DATABASE_PREPARED:
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    _options.setdefault("prepare_threshold", 2**31 - 1)
    _options["options"] = f"{_options.get('options', '')} -c plan_cache_mode=force_generic_plan".strip()
DATABASES["default"].setdefault("TEST", {})
if os.environ.get("TEST_DATABASE_NAME"):
    DATABASES["default"]["TEST"]["NAME"] = os.environ["TEST_DATABASE_NAME"]

REDIS_URL = os.environ["REDIS_URL"]
# Rendered tiles shared by every server process (annotations.slides.tiles). The platform's Redis
# unless set; production points it at a memory-only Redis with LRU eviction (docker/compose.yml).
TILE_CACHE_URL = os.environ.get("TILE_CACHE_URL") or REDIS_URL

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Login throttling (django-axes) on every form that calls authenticate(): /accounts/login/ and
# /admin/login/. Policy: AXES_FAILURE_LIMIT failed logins in a row for one username from one IP
# address lock that combination for AXES_COOLOFF_MINUTES, right password or not; other accounts
# from that address, and that account from other addresses, are unaffected (so a guesser cannot
# lock a user out everywhere). A successful login clears the count. Token-authenticated API calls
# never call authenticate(), so they are not counted, nor are authenticate() calls without a request
# (the test client's login()). `manage.py axes_reset` unlocks everyone,
# `axes_reset_username USER` one account.
AUTHENTICATION_BACKENDS = [
    "histoloop.lockout.LoginThrottleBackend",  # refuses a locked-out login before the password is checked
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env_bool("AXES_ENABLED", True)
AXES_FAILURE_LIMIT = int(os.environ.get("AXES_FAILURE_LIMIT", "5"))
AXES_COOLOFF_TIME = timedelta(minutes=float(os.environ.get("AXES_COOLOFF_MINUTES", "15")))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "histoloop.lockout.lockout_response"  # a page that says for how long
AXES_VERBOSE = False  # its banner on start-up; lockouts are still logged

if env_bool("FAST_PASSWORD_HASHING", False):
    # Tests only: PBKDF2's deliberate slowness costs seconds per created user on 2 cores.
    PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    ]

LANGUAGE_CODE = "en-gb"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "var" / "static"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}
WHITENOISE_USE_FINDERS = DEBUG

MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", BASE_DIR / "var" / "media"))
MEDIA_URL = "/media/"

# Request bodies (histoloop.body_limit, in front of Django): every route accepts MAX_REQUEST_BYTES,
# refused with 413 before the body is read; the slide upload routes accept MAX_UPLOAD_BYTES and the
# label import MAX_IMPORT_BYTES, from authenticated requests only. Django keeps bodies up to
# MAX_REQUEST_BYTES in memory, so only an authenticated upload is ever spooled to disk.
MAX_REQUEST_BYTES = int(os.environ.get("MAX_REQUEST_BYTES", str(4 * 1024**2)))
# Tiles of already-authorised viewers answered in front of Django (annotations.slides.lean); off
# sends every tile request through the whole Django stack (to compare, or to rule it out).
LEAN_TILE_ROUTE = env_bool("LEAN_TILE_ROUTE", True)
# The annotator's next-task and vote answered before Django for credentials it already authenticated
# (annotations/lean_queue.py); 0 sends them through Django's middleware and DRF, to compare.
LEAN_QUEUE_ROUTE = env_bool("LEAN_QUEUE_ROUTE", True)
# Django's HTTP requests under ASGI (histoloop.asgi_handler): the synchronous middleware chain and
# view run as one call in the request's thread; up to HTTP_THREADS idle threads per server process are
# kept for the next requests instead of a thread started per request. ONE_HOP_ASGI=0 serves with
# Django's stock ASGI handler (a thread hop per middleware), to compare.
ONE_HOP_ASGI = env_bool("ONE_HOP_ASGI", True)
HTTP_THREADS = int(os.environ.get("HTTP_THREADS", os.environ.get("DATABASE_POOL_SIZE", "16")))
MAX_UPLOAD_BYTES = int(os.environ.get("MAX_UPLOAD_BYTES", str(4 * 1024**3)))
MAX_IMPORT_BYTES = int(os.environ.get("MAX_IMPORT_BYTES", str(50 * 1024**2)))
FILE_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
SLIDE_IMPORT_ROOT = Path(os.environ.get("SLIDE_IMPORT_ROOT", BASE_DIR / "var" / "import"))

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

REST_FRAMEWORK = {
    # Session, then token authentication (DRF's), each credential's user remembered for a while:
    # annotations.member_cache says how long and what clears it.
    "DEFAULT_AUTHENTICATION_CLASSES": ["annotations.member_cache.CachedAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "histoloop.schema.AutoSchema",
    "EXCEPTION_HANDLER": "histoloop.exceptions.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "histoloop.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # JSON only unless DEBUG: the browsable API's HTML (inline styles the Content-Security-Policy
    # refuses, forms for every endpoint) is a developer's tool; /api/v1/docs/ documents the API.
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        *(["rest_framework.renderers.BrowsableAPIRenderer"] if DEBUG else []),
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    # `?format=` is ours (export formats), not DRF's renderer override.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Histoloop API",
    "DESCRIPTION": "Slides, patches, the annotation queue, votes, consensus and training rounds.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "ENUM_NAME_OVERRIDES": {
        "TaskStateEnum": "annotations.models.AnnotationTask.State",
        "RoundStateEnum": "learner.models.TrainingRound.State",
        "ConsensusMethodEnum": "annotations.models.ConsensusMethod",
    },
}

# Shared by every server process: the dashboard's cached counters (annotations.stats).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "histoloop",
        "OPTIONS": {"socket_timeout": 5},
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 defaults socket_timeout to 5 s, the same as channels-redis's blocking BZPOPMIN
            # wait, so under load a consumer's receive loop dies with "Timeout reading". Give reads room.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
            "prefix": os.environ.get("CHANNELS_PREFIX", "histoloop"),
        },
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_TASK_ROUTES = {
    # Exact names before patterns (Celery checks them first): the stale-round check must not wait
    # behind a round on the gpu worker, or on a dead one.
    "learner.tasks.fail_stale_rounds": {"queue": "cpu"},
    "learner.tasks.build_similar_index": {"queue": "cpu"},
    "learner.tasks.*": {"queue": "gpu"},
    # annotations.tasks.ingest_slide is in annotations/slides/tasks.py (it kept its name when it moved).
    "annotations.tasks.*": {"queue": "cpu"},
}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = int(os.environ.get("CELERY_TASK_TIME_LIMIT", "7200"))
CELERY_TASK_SOFT_TIME_LIMIT = int(os.environ.get("CELERY_TASK_SOFT_TIME_LIMIT", "7000"))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Namespaced app settings, read through the learner.conf dataclass. (How long a lease lasts is a
# project setting, Project.lease_minutes, not a server one.)
LEARNER = {
    "WEIGHTS_DIR": os.environ.get("LEARNER_WEIGHTS_DIR", str(BASE_DIR / "var" / "models")),
    "CACHE_DIR": os.environ.get("LEARNER_CACHE_DIR", str(BASE_DIR / "var" / "cache")),
    "DEVICE": os.environ.get("LEARNER_DEVICE", "auto"),
    "MAP_METHOD": os.environ.get("LEARNER_MAP_METHOD", "pca"),  # the embedding map's layout: pca | umap
    "PRETRAINED": os.environ.get("LEARNER_PRETRAINED", "package"),
    "PRETRAINED_DIR": os.environ.get("LEARNER_PRETRAINED_DIR", str(BASE_DIR / "var" / "pretrained")),
    "MULTISCALE": env_bool("LEARNER_MULTISCALE", True),
    "SELF_TRAINING": env_bool("LEARNER_SELF_TRAINING", True),
    "HEAD_MAX_LABELS": int(os.environ.get("LEARNER_HEAD_MAX_LABELS", "50000")),
    "CPU_BACKEND": os.environ.get("LEARNER_CPU_BACKEND", "auto"),
    "EMBED_READER": os.environ.get("LEARNER_EMBED_READER", "threads"),
    "EMBED_READERS": int(os.environ.get("LEARNER_EMBED_READERS", "2")),
    "SHARD_PATCHES": int(os.environ.get("LEARNER_SHARD_PATCHES", "2048")),
    "SHARD_QUEUE": os.environ.get("LEARNER_SHARD_QUEUE", "gpu"),
    "BACKGROUND_EMBEDDING": env_bool("LEARNER_BACKGROUND_EMBEDDING", True),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"large_image": {"level": "WARNING"}, "pgserver": {"level": "WARNING"}},
}

# HTTPS: a production server is reached over HTTPS, through a TLS-terminating proxy that sends
# X-Forwarded-Proto (docker/README.md). HTTPS=1 (the default unless DEBUG) redirects plain http,
# marks the session and CSRF cookies Secure and sends HSTS (on https responses only, as browsers
# ignore it on http). `make demo` serves plain http on loopback and sets HTTPS=0. Each SECURE_*
# value can also be set on its own.
HTTPS = env_bool("HTTPS", not DEBUG)
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", HTTPS)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", HTTPS)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", HTTPS)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000" if HTTPS else "0"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# Content-Security-Policy (django-csp 4): scripts, styles, images and connections (API calls, the
# project websocket) from this origin only; no inline script or style except a block carrying the
# response's nonce (request.csp_nonce), no plugins, no framing. Images also from data:/blob:
# (OpenSeadragon makes some of its images that way). The API docs page widens it for the Swagger UI
# bundle it loads (histoloop/urls.py).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF, NONCE],
        "img-src": [SELF, "data:", "blob:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}
