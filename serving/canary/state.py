"""A canary's record: its alias, its two versions, its state and step, and its config.

Plain values, importing nothing of the gateway but the canary's config
(``serving.canary.analysis``): the store that keeps them in the state database
(``serving.state.canaries``) and the table's one-active-canary index
(``serving.state.tables``) build on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from serving.canary.analysis import CanaryConfig
from serving.errors import APIError

State = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE: tuple[State, ...] = ("running", "paused")
Variant = Literal["stable", "canary"]


class CanaryError(APIError):
    """A canary operation was refused (the admin API answers with its code's status)."""


@dataclass
class Canary:
    id: int
    alias: str
    candidate: int
    stable: int
    state: State
    step: int
    config: CanaryConfig
    forced: bool
    step_started_at: float
    created_at: float
    last_analysis: dict[str, Any] | None = None
    # The state and step as the database last had them (read or written by this gateway): a write is made only
    # if they are still so, so one gateway never writes over another's pause, abort or step.
    seen: tuple[str, int] | None = field(default=None, compare=False)

    @property
    def weight(self) -> float:
        """Share of users on the candidate now (0-1)."""
        return self.config.steps[self.step] / 100 if self.state in ACTIVE else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "alias": self.alias,
            "candidate": self.candidate,
            "stable": self.stable,
            "state": self.state,
            "step": self.step + 1,
            "steps": self.config.steps,
            "weight": self.weight,
            "step_started_at": self.step_started_at,
            "created_at": self.created_at,
            "forced": self.forced,
            "config": self.config.model_dump(),
            "last_analysis": self.last_analysis,
        }
