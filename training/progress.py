"""Training callbacks: a live progress bar (loss, tokens/s, ETA) and a metrics JSONL file."""

from __future__ import annotations

import json
import time
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
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                           loss="-", eval="-", tps="-")  # fmt: skip
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
