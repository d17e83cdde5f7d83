# syntax=docker/dockerfile:1
# Production image: slim, multi-stage, non-root (uid 10001), `stsync run` as the default command.
# Config is mounted as a file (STSYNC_CONFIG), secrets come from the environment. No embedded PostgreSQL here.
#
#   docker build --build-arg STSYNC_COMMIT=$(git rev-parse --short=12 HEAD) -t stsync .
#
# Reproducible: the base is pinned to a patch release of Debian bookworm's slim Python, and every dependency is
# installed from requirements.lock with its hashes (pip-compile --generate-hashes; docs/deploy.md says how to
# refresh it). .ci/run runs the install steps below by hand (there is no Docker engine on the CI machine).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/stsync
# dependencies first, in their own layer: a code change does not reinstall them
COPY requirements.lock /src/requirements.lock
RUN /opt/stsync/bin/pip install --require-hashes --no-deps -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY sync /src/sync
COPY migrations /src/migrations
RUN /opt/stsync/bin/pip install --no-deps /src && /opt/stsync/bin/pip check

FROM ${PYTHON_IMAGE}
ARG STSYNC_COMMIT=unknown
# a numeric user: Kubernetes' runAsNonRoot can only verify a uid
RUN useradd --system --uid 10001 --gid 0 --home-dir /nonexistent --shell /usr/sbin/nologin stsync
COPY --from=build /opt/stsync /opt/stsync
ENV PATH=/opt/stsync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STSYNC_CONFIG=/etc/stsync/stsync.yaml \
    STSYNC_COMMIT=${STSYNC_COMMIT}
USER 10001:0
# /healthz, /readyz and /metrics, when the config sets observability.listen: 0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["stsync", "health"]
ENTRYPOINT ["stsync"]
CMD ["run"]
