# syntax=docker/dockerfile:1
#
# The pgproxy container image.
#
#   docker build -t pgproxy:0.1.0 .
#   docker run --rm -p 6432:6432 -p 9127:9127 --stop-timeout 40 \
#       -e PGPROXY_SERVER=db.internal:5432 -e PGPROXY_USERS=app:app-password pgproxy:0.1.0
#
# Configure it like pgproxy anywhere else: PGPROXY_<NAME> environment variables, flags after the
# image name (`docker run ... pgproxy:0.1.0 --default-pool-size 30`), or a TOML file mounted into
# the container and named by PGPROXY_CONFIG (e.g. -v "$PWD/pgproxy.toml:/etc/pgproxy/pgproxy.toml:ro"
# -e PGPROXY_CONFIG=/etc/pgproxy/pgproxy.toml). No file is required. The environment wins over the
# file, so `listen` and `metrics_listen`, set below, are changed with -e or flags, not in the file.
#
# tests/e2e/test_container.py checks this file without Docker: it parses it, builds the virtualenv
# the way the builder stage does and runs the entrypoint against a real PostgreSQL.

# Both stages use the same base image: the virtualenv's python is a link to its interpreter.
FROM python:3.12-slim-bookworm AS builder

# A C compiler, in this stage only: mypyc compiles pgproxy's hot path (setup.py; README,
# Performance). The base image has Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/pgproxy
# What `pip install` needs to build the wheel; .dockerignore keeps everything else out.
COPY pyproject.toml setup.py README.md /src/
COPY pgproxy /src/pgproxy
# A build that cannot compile the hot path fails instead of shipping it interpreted.
ENV PGPROXY_COMPILE=1
# The runtime dependencies only (no [dev] extras); mypy, which compiles, stays in pip's build
# environment. The cache mount keeps downloads between builds without putting them into a layer.
RUN --mount=type=cache,target=/root/.cache/pip /opt/pgproxy/bin/pip install /src


FROM python:3.12-slim-bookworm

# tini runs as PID 1: it forwards SIGTERM/SIGINT/SIGHUP to pgproxy and reaps zombies (the
# processes of `--workers N`). A Python process as PID 1 would also get signals it installs
# handlers for, but nothing would reap orphans and a signal arriving before the handlers are
# installed would be ignored (the kernel's rule for PID 1) instead of stopping the container.
# jemalloc: with Python's own allocator the memory of a burst of clients stays with the process
# after they leave (a 1 MiB arena lives as long as any object in it); jemalloc gives freed pages
# back within seconds (README, Memory). The link gives LD_PRELOAD one path on every architecture.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libjemalloc.so.2 | head -n 1)" /usr/local/lib/libjemalloc.so.2

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without a runAsUser.
RUN groupadd --system --gid 10001 pgproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgproxy

COPY --from=builder /opt/pgproxy /opt/pgproxy

# listen (0.0.0.0:6432) and metrics_listen (0.0.0.0:9127) are pgproxy's defaults and match
# EXPOSE and the HEALTHCHECK below; no ENV sets them, since the environment would win over a
# mounted TOML file. The bytecode was compiled by pip in the builder; the root filesystem may
# be read-only.
# PYTHONMALLOC=malloc hands Python's small objects to jemalloc too; its background thread
# returns pages freed for a second (pgproxy logs "memory allocator: jemalloc" at start).
ENV PATH=/opt/pgproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    LD_PRELOAD=/usr/local/lib/libjemalloc.so.2 \
    MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0

USER 10001:10001
# 6432: PostgreSQL clients; 9127: /metrics, /healthz, /readyz.
EXPOSE 6432 9127

# On SIGTERM pgproxy fails /readyz, accepts new clients for shutdown_grace_period more (0 by
# default), then stops accepting, lets clients inside a transaction finish (at most
# shutdown_timeout, 30 s by default) and exits 0. Docker kills after 10 s unless told otherwise:
# give `docker stop -t` / `docker run --stop-timeout` / compose's stop_grace_period more.
STOPSIGNAL SIGTERM

# Liveness, with the image's own python (the slim image has no curl). Move it along if
# metrics_listen moves; readiness (Postgres reachable, not draining) is /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9127/healthz', timeout=2)"]

ENTRYPOINT ["tini", "--", "pgproxy"]
CMD []
