# The processor's image (docker-compose.yml: setup, worker, loadgen). Runtime deps only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
# the runtime dependencies at the lock's versions and hashes (ops/lock writes it)
COPY requirements/runtime.txt ./requirements/runtime.txt
# also the demo's registry and schema (PROCESSOR_ENTITIES=/app/processor/tools/demo_data/
# entities.toml): package data
COPY processor ./processor
RUN pip install --require-hashes -r requirements/runtime.txt \
    && pip install --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --no-create-home processor

USER processor
EXPOSE 9108
CMD ["processor", "run"]
