# syntax=docker/dockerfile:1
# The balance server. Build: docker build -t balance .   Run it against a PostgreSQL with
# BALANCE_DSN set (see docker-compose.yml); without a DSN it starts an embedded PostgreSQL in
# /data, which suits a trial, not production.

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/balance
COPY generated/ generated/
COPY balance_server/ balance_server/
COPY pyproject.toml README.md ./
RUN /opt/balance/bin/pip install --no-cache-dir ./generated . \
    && /opt/balance/bin/pip install --no-cache-dir grpcio-health-checking

FROM python:3.11-slim
RUN useradd --system --create-home --uid 10001 balance \
    && mkdir /data && chown balance /data
COPY --from=build /opt/balance /opt/balance
# A tiny health probe through the standard gRPC health service.
COPY <<'PROBE' /opt/balance/health_probe.py
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

with grpc.insecure_channel("127.0.0.1:50051") as channel:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
sys.exit(0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1)
PROBE
USER balance
ENV BALANCE_LISTEN=0.0.0.0:50051 \
    BALANCE_DATA_DIR=/data/pgdata \
    PYTHONUNBUFFERED=1
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/balance/bin/python", "/opt/balance/health_probe.py"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/balance/bin/balance-server"]
CMD ["serve"]
