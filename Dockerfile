# The processor's image (docker-compose.yml: setup, worker, loadgen). Runtime deps only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
# also the demo's registry and schema (PROCESSOR_ENTITIES=/app/processor/tools/demo_data/
# entities.toml): package data
COPY processor ./processor
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home processor

USER processor
EXPOSE 9108
CMD ["processor", "run"]
