#!/bin/sh
# Entrypoint of both Histoloop images (web, migrate, cpu and gpu workers): checks the
# environment, makes the data directories, then runs the command it was given.
set -eu

# manage.py starts an embedded PostgreSQL/Redis when these are unset. Inside a container that
# would put the data in a throwaway layer, so refuse instead.
if [ -z "${DATABASE_URL:-}" ] || [ -z "${REDIS_URL:-}" ]; then
    echo "histoloop: DATABASE_URL and REDIS_URL must both be set (copy docker/.env.example to docker/.env and fill it in)." >&2
    exit 64
fi

# The data directories live on a volume. A fresh named volume or a bind mount may not have
# them yet; they must be writable by this user (uid 1000).
for dir in "${MEDIA_ROOT:-}" "${LEARNER_WEIGHTS_DIR:-}" "${LEARNER_CACHE_DIR:-}"; do
    [ -n "$dir" ] || continue
    if ! mkdir -p "$dir" 2>/dev/null || [ ! -w "$dir" ]; then
        echo "histoloop: $dir is not writable by uid $(id -u). If it is a bind mount, run 'chown -R $(id -u):$(id -g)' on the host directory." >&2
        exit 73
    fi
done
# Slides to import may sit on a read-only mount: only make sure the directory exists.
if [ -n "${SLIDE_IMPORT_ROOT:-}" ] && [ ! -d "$SLIDE_IMPORT_ROOT" ]; then
    mkdir -p "$SLIDE_IMPORT_ROOT" 2>/dev/null || true
fi

exec "$@"
