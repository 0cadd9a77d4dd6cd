"""The replay store: per prompt, the ``capacity`` newest stored trajectories with the log-probs they were sampled with.

Every rank holds the same store: the candidates of a step (a rank's own rows) are all-gathered in rank order and every
rank appends them in that order (``ReplayStore.extend`` after ``TrainingWorld.gather_list``), so the stores never
diverge. The store is plain lists (JSON in ``trainer_state.json``: float32 values round-trip exactly through Python's
float repr), so a resumed run continues with the very store it had.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass


@dataclass
class StoredTrajectory:
    """One completion: its tokens up to and including EOS, the per-token log-probs of the policy that sampled it
    (same length), its text, whether it hit the length limit, and the step it was sampled at."""

    completion_ids: list[int]
    behaviour_logp: list[float]
    text: str
    truncated: bool
    step: int

    def __post_init__(self):
        if len(self.completion_ids) != len(self.behaviour_logp):
            raise ValueError(
                f"StoredTrajectory: {len(self.completion_ids)} tokens but {len(self.behaviour_logp)} log-probs"
            )


class ReplayStore:
    """Bounded per-prompt store (FIFO: the newest ``capacity`` of each prompt are kept)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"ReplayStore: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.entries: dict[str, list[StoredTrajectory]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def add(self, key: str, trajectory: StoredTrajectory) -> None:
        kept = self.entries.setdefault(key, [])
        kept.append(trajectory)
        del kept[: -self.capacity]

    def extend(self, items: list[tuple[str, StoredTrajectory]]) -> None:
        """Append (prompt, trajectory) pairs in order (every rank the same gathered order)."""
        for key, trajectory in items:
            self.add(key, trajectory)

    def pick(self, key: str, rng: random.Random) -> StoredTrajectory | None:
        """One stored trajectory of ``key`` drawn with ``rng`` (None when the prompt has none)."""
        kept = self.entries.get(key)
        return kept[rng.randrange(len(kept))] if kept else None

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "entries": {k: [asdict(t) for t in v] for k, v in self.entries.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"ReplayStore: checkpoint capacity {state['capacity']} != {self.capacity}")
        self.entries = {k: [StoredTrajectory(**t) for t in v] for k, v in state["entries"].items()}
