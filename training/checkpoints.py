"""Where an unfinished run keeps its checkpoints, and which one ``--resume`` continues from.

Kept apart from ``training.train`` (and free of torch) so that ``lorafleet demo``
can tell whether a run is resumable without loading the training stack.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"


def staging_of(out: Path) -> Path:
    """A run writes into ``<out>.partial`` and renames it to ``<out>`` when it is done."""
    return out.with_name(out.name + ".partial")


def last_checkpoint(staging: Path) -> Path | None:
    """The newest complete checkpoint: a run killed mid-save leaves one without its trainer state, written last."""
    complete = [p for p in (staging / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)
