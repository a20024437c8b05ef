"""Training callbacks: a live progress bar (loss, tokens/s, ETA), a metrics JSONL file, status announcements,
and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class MetricsLog(TrainerCallback):
    """Appends every log event (loss, eval loss, learning rate, tokens) as one JSON line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs and state.is_world_process_zero:
            row = {"step": state.global_step, "time": round(time.time(), 3)} | {
                k: (float(v) if isinstance(v, int | float) else v) for k, v in logs.items()
            }
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


class RichProgress(TrainerCallback):
    """One live line: steps, loss, eval loss, tokens/s and the time left."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None
        self.started = 0.0
        self.tokens_at_start = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.started = time.perf_counter()
        self.tokens_at_start = int(state.num_input_tokens_seen or 0)
        if not Console().is_terminal:
            return  # logs and CI: one plain line per logging step instead (on_log)
        self.progress = Progress(
            TextColumn("[bold]training[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", eval="-", tps="-"
        )
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        if self.progress is None:
            self._plain_line(state, logs)
            return
        fields: dict[str, Any] = {}
        if "loss" in logs:
            fields["loss"] = f"{float(logs['loss']):.4f}"
        if "eval_loss" in logs:
            fields["eval"] = f"{float(logs['eval_loss']):.4f}"
        if state.num_input_tokens_seen:
            elapsed = time.perf_counter() - self.started
            fields["tps"] = f"{(state.num_input_tokens_seen - self.tokens_at_start) / max(elapsed, 1e-6):.0f}"
        self.progress.update(self.task, **fields)

    def _plain_line(self, state: Any, logs: dict[str, Any]) -> None:
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key in ("loss", "eval_loss"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        elapsed = time.perf_counter() - self.started
        if state.num_input_tokens_seen and elapsed > 0:
            parts.append(f"{(state.num_input_tokens_seen - self.tokens_at_start) / elapsed:.0f} tok/s")
        if state.global_step and elapsed > 0:
            left = elapsed / state.global_step * (state.max_steps - state.global_step)
            parts.append(f"ETA {left:.0f} s")
        print("training: " + ", ".join(parts), flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class Announce(TrainerCallback):
    """Hands a status (step, max_steps, loss, tokens/s, ETA) to ``announce`` every ``every_s`` seconds.

    ``lorafleet train --publish ALIAS`` announces it in the adapter store
    (``AdapterStore.announce_training``), where a gateway reads it to tell a
    client when the alias's first version will be servable, and ``lorafleet
    demo`` to draw its progress lines. Evaluation steps refresh it too, so a
    long evaluation does not look like a dead run.
    """

    def __init__(self, announce: Callable[[dict[str, Any]], None], every_s: float = 2.0) -> None:
        self.announce, self.every_s = announce, every_s
        self.started = 0.0
        self.first_step = 0
        self.tokens_at_start = 0
        self.last = 0.0
        self.status: dict[str, Any] = {"phase": "preparing"}

    def _send(self, state: Any, phase: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not state.is_world_process_zero or (not force and now - self.last < self.every_s):
            return
        self.last = now
        elapsed = now - self.started
        done = state.global_step - self.first_step
        self.status |= {"phase": phase, "step": state.global_step, "max_steps": state.max_steps}
        if done > 0 and elapsed > 0:
            self.status["eta_s"] = round(elapsed / done * (state.max_steps - state.global_step), 1)
        if state.num_input_tokens_seen and elapsed > 0:
            self.status["tokens_per_s"] = round((state.num_input_tokens_seen - self.tokens_at_start) / elapsed, 1)
        self.announce(dict(self.status))

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.started = time.perf_counter()
        self.first_step = state.global_step
        self.tokens_at_start = int(state.num_input_tokens_seen or 0)
        self._send(state, "training", force=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._send(state, "training")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.status["loss"] = round(float(logs["loss"]), 4)
        if logs and "eval_loss" in logs:
            self.status["eval_loss"] = round(float(logs["eval_loss"]), 4)

    def on_prediction_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._send(state, "evaluating")

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self._send(state, "saving", force=True)


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM: finish the current step, save a checkpoint, stop (``--resume`` continues from it)."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None
        self._asked = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        """Take over SIGINT/SIGTERM (main thread only; the first signal asks, a second one interrupts)."""

        def ask(signum: int, frame: Any) -> None:
            if self._asked:
                signal.default_int_handler(signum, frame)
            self._asked = True

        self._previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if self._asked and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
