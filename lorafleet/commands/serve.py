"""``lorafleet serve``: run the gateway (it starts and supervises vLLM unless ``LORAFLEET_ENGINE_URL`` names one)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lorafleet.commands.model import require_base_model
from lorafleet.console import console, fail

if TYPE_CHECKING:
    from serving.config import GatewaySettings

HostOpt = Annotated[str | None, typer.Option(help="Listen address (default: LORAFLEET_HOST or 127.0.0.1).")]
PortOpt = Annotated[int | None, typer.Option(help="Listen port (default: LORAFLEET_PORT or 8000).")]


WorkerOpt = Annotated[
    bool,
    typer.Option(
        "--worker/--no-worker",
        help="Also run a fine-tuning worker beside the gateway (`lorafleet worker`; its log: "
        "data_dir/logs/worker.log). Run workers on their own where the gateway restarts often.",
    ),
]


def serve(host: HostOpt = None, port: PortOpt = None, worker: WorkerOpt = True) -> None:
    """Run the gateway; it starts and supervises vLLM (and a fine-tuning worker). Ctrl-C stops them all."""
    settings = gateway_settings(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console.print(f"gateway on {settings_url(settings)}; starting vLLM (about 30 s)…")
    threading.Thread(target=_say_when_ready, args=(settings_url(settings),), daemon=True).start()
    with start_worker(settings.data_dir) if worker else contextlib.nullcontext():
        run_gateway(settings)


@contextlib.contextmanager
def start_worker(data_dir: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``lorafleet worker`` as a child for the block (same settings and ``env``, log in
    data_dir/logs/worker.log); stopped at the end the way Ctrl-C stops it: its trainings checkpoint and go back
    to the queue."""
    log_path = data_dir / "logs" / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,
            env=os.environ | (env or {}) | {"LORAFLEET_WORKER_PARENT": str(os.getpid())},
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway_settings(host: str | None, port: int | None) -> GatewaySettings:
    """The gateway's settings from the environment, with ``--host`` / ``--port`` on top; refused ones exit 2."""
    from serving.config import GatewaySettings

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise fail(f"invalid settings: {exc}") from exc
    require_base_model(settings)
    return settings


def settings_url(settings: GatewaySettings) -> str:
    from serving.config import local_url

    return local_url(settings)


def run_gateway(settings: GatewaySettings, log_file: Path | None = None) -> None:
    """Serve until Ctrl-C/SIGTERM: stop accepting, let in-flight requests finish (up to the grace period), stop vLLM.

    ``log_file``: the gateway's log goes there instead of the terminal (the demo draws its own screen).
    """
    import uvicorn

    from serving.app import build_app
    from serving.http.server import header_deadline

    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine health check is noise
    # With a log file, uvicorn's loggers propagate to it (log_config=None leaves logging as configured above).
    log_config = None if log_file is not None else uvicorn.config.LOGGING_CONFIG
    uvicorn.run(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=log_config,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        http=header_deadline(settings.header_timeout_s),  # a client's headers arrive in time, or it is cut off
    )


def is_ready(url: str) -> bool:
    """One probe of the gateway's ``/readyz``."""
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(url: str) -> None:
    """Block until the gateway's ``/readyz`` says ready."""
    while not is_ready(url):
        time.sleep(1.0)


def _say_when_ready(url: str) -> None:
    wait_ready(url)
    console.print(f"\n[bold green]ready[/] at {url}  (Ctrl-C stops the gateway and vLLM)")


def serve_engine(
    host: Annotated[str, typer.Option(help="Listen address.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Listen port.")] = 8000,
    base: Annotated[
        str | None, typer.Option(help="The base model, as LORAFLEET_BASE_MODEL (default: that setting).")
    ] = None,
    max_loras: Annotated[
        int | None, typer.Option(help="Adapters resident at once (default: LORAFLEET_MAX_LORAS).")
    ] = None,
    extra: Annotated[list[str] | None, typer.Argument(help="More vLLM arguments, after `--`.")] = None,
) -> None:
    """Run one vLLM engine in the foreground with the flags a gateway expects of its engines (an engine pod of
    the Helm chart runs this). Its API key comes from VLLM_API_KEY; gateways name the engine in their engines file.
    """
    import os

    from serving.config import GatewaySettings
    from serving.engines.specs import EngineSpec
    from serving.engines.vllm import child_env, vllm_command

    key = os.environ.get("VLLM_API_KEY")
    if not key:
        raise fail("VLLM_API_KEY is not set: an engine others can reach needs a key (the gateways' engine key)")
    try:
        # Only the engine's settings are read here; the gateway's own (keys, listen address) do not apply.
        settings = GatewaySettings(dev_mode=True, host="127.0.0.1")
        spec = EngineSpec(
            name="engine", port=port, base=base, max_loras=max_loras or settings.max_loras, extra_args=extra or []
        )
    except ValueError as exc:
        raise fail(f"invalid settings: {exc}") from exc
    command = vllm_command(settings, spec, host=host)
    require_base_model(settings, command[command.index("--model") + 1])
    console.print(" ".join(command[3:]))
    os.execvpe(command[0], command, child_env(settings, key, spec=spec))
