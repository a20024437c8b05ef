"""Start ``lorafleet serve`` (or vLLM alone) as a child process and wait until it is ready (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningGateway:
    proc: subprocess.Popen[bytes]
    url: str
    engine_url: str
    data_dir: Path
    admin_key: str

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in (self.data_dir / "gateway.log", self.data_dir / "logs" / "vllm.log"):
            if path.is_file():
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 60) -> int:
        """SIGINT, as Ctrl-C would send; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_gateway(
    data_dir: Path,
    base_model: Path,
    *,
    timeout: float = 400,
    worker: bool = False,
    port: int | None = None,
    **settings: str,
) -> RunningGateway:
    """Run ``lorafleet serve`` on free ports (or ``port``) over ``data_dir``; returns once ``/readyz`` says ready.
    ``worker``: with its fine-tuning worker (tests start theirs apart, to kill and restart it)."""
    port, engine_port = port or free_port(), free_port()
    admin_key = settings.pop("admin_key", None) or secrets.token_hex(16)
    env = os.environ | {
        "LORAFLEET_DATA_DIR": str(data_dir),
        "LORAFLEET_BASE_MODEL": str(base_model),
        "LORAFLEET_ENGINE_PORT": str(engine_port),
        "LORAFLEET_ADMIN_KEY": admin_key,
    }
    env |= {f"LORAFLEET_{k.upper()}": v for k, v in settings.items()}
    with (data_dir / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "serve", "--port", str(port), "--worker" if worker else "--no-worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gw = RunningGateway(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{engine_port}", data_dir, admin_key)
    if _answers(proc, f"{gw.url}/readyz", timeout):
        return gw
    if proc.poll() is not None:
        raise RuntimeError(f"the gateway exited with code {proc.returncode}:\n{gw.log_tail()}")
    gw.stop()
    raise RuntimeError(f"the gateway was not ready after {timeout:.0f} s:\n{gw.log_tail()}")


def _answers(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """Whether ``url`` answered 200 within ``timeout`` seconds (asked every second); ``False`` at once when
    ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


@dataclass
class RunningEngine:
    proc: subprocess.Popen[bytes]
    url: str
    key: str  # its API key: what the gateway sends, and what a benchmark calling it directly needs

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_engine(
    data_dir: Path,
    base_model: Path,
    *,
    timeout: float = 400,
    cpus: str | None = None,
    port: int | None = None,
    key: str | None = None,
    **settings: str,
) -> RunningEngine:
    """vLLM exactly as the gateway starts its child (command, environment), but with a key the caller knows.

    For comparisons with direct calls: a gateway's own child answers only that gateway. Pass ``url`` and ``key``
    to ``start_gateway(..., engine_url=..., engine_key=...)``. ``port`` and ``key``: an engine started again where
    its gateways expect it.
    """
    from serving.config import GatewaySettings
    from serving.engines.specs import EngineSpec
    from serving.engines.vllm import child_env, child_setup, vllm_command

    config = GatewaySettings(
        data_dir=data_dir,
        base_model=str(base_model),
        engine_port=port or free_port(),
        dev_mode=True,
        **settings,  # type: ignore[arg-type]
    )
    key = key or secrets.token_urlsafe(32)
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    with (data_dir / "logs" / "vllm.log").open("ab") as log:
        spec = EngineSpec(name="engine", port=config.engine_port, max_loras=config.max_loras, cpus=cpus)
        proc = subprocess.Popen(
            vllm_command(config, spec),
            env=child_env(config, key, spec=spec),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_setup(config.engine_nice),
        )
    engine = RunningEngine(proc, f"http://127.0.0.1:{config.engine_port}", key)
    if _answers(proc, f"{engine.url}/health", timeout):
        return engine
    if proc.poll() is not None:
        raise RuntimeError(f"vLLM exited with code {proc.returncode}; see {data_dir / 'logs' / 'vllm.log'}")
    engine.stop()
    raise RuntimeError(f"vLLM was not healthy after {timeout:.0f} s; see {data_dir / 'logs' / 'vllm.log'}")


# Real servers for tests and benchmarks of several gateways (Debian's packages; `make test` installs them).


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on loopback (Debian's package; ``make test`` installs it)."""

    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return self.database(0)

    def database(self, number: int) -> str:
        """The URL of one of its 16 databases: tests whose gateways count the same tenant ids use different ones."""
        return f"redis://127.0.0.1:{self.port}/{number}"

    @classmethod
    def start(cls, workdir: Path, port: int | None = None) -> RedisServer:
        import shutil
        import socket
        import time

        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is missing: `apt-get install redis-server` (make test does it)")
        port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return cls(proc, port, workdir)
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"redis-server did not start on port {port}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster on loopback (Debian's ``postgresql``; ``make test`` installs it): made with
    ``initdb`` in a temporary directory (as the ``postgres`` user when the tests run as root, which initdb
    refuses), trust authentication, no fsync."""

    datadir: Path
    port: int
    run_as: list[str]
    bindir: Path

    @classmethod
    def create(cls, port: int | None = None) -> PostgresServer:
        """A new cluster in its own directory under the system's temporary folder (pytest's are private to
        root: the ``postgres`` user could not reach them)."""
        import os
        import shutil
        import tempfile

        bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
        if bindir is None or not (bindir / "initdb").exists():
            raise RuntimeError("PostgreSQL is missing: `apt-get install postgresql` (make test does it)")
        run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        workdir = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
        if run_as:
            shutil.chown(workdir, "postgres", "postgres")
        datadir = workdir / "data"
        made = subprocess.run(
            [*run_as, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "-A", "trust", "--no-sync"],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr or made.stdout}")
        server = cls(datadir, port or free_port(), run_as, bindir)
        server.start()
        return server

    def _ctl(self, *args: str) -> None:
        command = [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-w", "-l", str(self.datadir / "server.log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "-m", mode, "stop")

    def remove(self) -> None:
        import shutil

        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.datadir.parent, ignore_errors=True)

    def database(self) -> str:
        """The URL of a new, empty database of its own."""
        import uuid

        import psycopg

        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
