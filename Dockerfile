# The stages' image for docker-compose.yml. (Not buildable on the development machines,
# which have no Docker engine.) It installs exactly what `make install` installs: both run
# `make deps`, the one list (here with the image's pip, not editable).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git libgomp1 make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY Makefile pyproject.toml constraints.txt README.md ./
COPY imgflow imgflow
COPY schemas schemas
COPY watchers watchers
COPY consumers consumers
COPY infra infra
# llama-cpp-python compiles here for x86-64-v3 (the Makefile's LLAMA_CMAKE), not the build machine's CPU.
RUN make deps PIP="pip --no-cache-dir" EDITABLE= WHEELS=/tmp/wheels && rm -rf /tmp/wheels
ENV HF_HUB_OFFLINE=1 IMGFLOW_LOG_FORMAT=json IMGFLOW_METRICS_PORT=9100 IMGFLOW_METRICS_ADDR=0.0.0.0
EXPOSE 9100
ENTRYPOINT ["imgflow"]
