# The processor's image (docker-compose.yml: setup, worker, loadgen). Runtime deps only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY processor ./processor
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home processor
# the demo's entity registry (PROCESSOR_ENTITIES=/app/ops/demo/entities.toml) and schema
COPY ops/demo ./ops/demo

USER processor
EXPOSE 9108
CMD ["processor", "run"]
