# kafka-outbox: the `outbox` CLI (migrate, relay, consume, status, ...) and the examples.
# Used by the migrate, relay, app and consumer services of docker-compose.yml.
#
#   docker build -t kafka-outbox .
#   docker run --rm kafka-outbox                  # outbox --help
#   docker run --rm -e OUTBOX_DB=... kafka-outbox outbox status
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Build and install the package from a scratch copy of the sources. Only what
# the wheel needs is copied (not .venv, .git or caches), and the dependency
# wheels (psycopg[binary], confluent-kafka) are prebuilt: no compiler needed.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY outbox/ outbox/
COPY consumer/ consumer/
COPY migrations/ migrations/
RUN pip install . && rm -rf /src

# The examples live outside the installed packages: /app holds only examples/,
# so PYTHONPATH=/app lets `outbox consume examples.order_projector:OrderProjector`
# and `python -m examples.order_app` import them without shadowing the
# installed `outbox` package (which carries its migrations inside the wheel).
WORKDIR /app
COPY examples/ examples/
ENV PYTHONPATH=/app

RUN groupadd --system --gid 10001 outbox \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin outbox
USER 10001:10001

# The relay serves /metrics, /healthz and /readyz here.
EXPOSE 9400

CMD ["outbox", "--help"]
