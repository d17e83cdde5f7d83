# syntax=docker/dockerfile:1
# Production image: slim, multi-stage, non-root, `stsync run` as the entrypoint.
# Config is mounted as a file (STSYNC_CONFIG), secrets come from the environment. No embedded PostgreSQL here.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sync ./sync
COPY migrations ./migrations
RUN python -m venv /opt/stsync \
 && /opt/stsync/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/stsync/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin stsync
COPY --from=build /opt/stsync /opt/stsync
ENV PATH=/opt/stsync/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    STSYNC_CONFIG=/etc/stsync/stsync.yaml
USER stsync
ENTRYPOINT ["stsync"]
CMD ["run"]
