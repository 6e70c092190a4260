"""FIFO replay buffer of turn-level transitions for the ArCHer utterance critic.

A transition is one agent turn: the dialogue text the policy saw (``obs``), what it said (``action``), the
turn's reward, the dialogue text before the next turn (``next_obs``, ``""`` when the episode ended) and the
``done`` flag.  The buffer keeps the ``capacity`` most recent transitions and samples uniformly *with
replacement* from its own seeded numpy generator, so that a run resumed from ``state_dict()`` draws exactly
the minibatches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Transition", "ReplayBuffer"]

_FIELDS = ("obs", "action", "reward", "next_obs", "done")


@dataclass(frozen=True)
class Transition:
    """One turn ``(s, a, r, s', done)``; texts are plain strings, ``reward`` a finite float."""

    obs: str
    action: str
    reward: float
    next_obs: str
    done: bool

    def __post_init__(self) -> None:
        for name in ("obs", "action", "next_obs"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"Transition.{name} must be a str, got {type(value).__name__}")
        try:
            reward = float(self.reward)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Transition.reward must be a number, got {self.reward!r}") from exc
        if not math.isfinite(reward):
            raise ValueError(f"Transition.reward must be finite, got {reward}")
        # normalise numpy / torch scalars to plain python types (keeps state_dict JSON-able)
        object.__setattr__(self, "reward", reward)
        object.__setattr__(self, "done", bool(self.done))

    @classmethod
    def from_mapping(cls, record: Mapping[str, Any]) -> Transition:
        """Build from a dict with keys obs, action, reward, next_obs, done (e.g. a ``turn_records`` entry)."""
        missing = [k for k in _FIELDS if k not in record]
        if missing:
            raise ValueError(f"transition record is missing keys {missing}; expected {list(_FIELDS)}")
        return cls(**{k: record[k] for k in _FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _FIELDS}


class ReplayBuffer:
    """Fixed-capacity FIFO buffer; when full, adding a transition evicts the oldest one.

    Storage is a ring: ``self._items`` holds at most ``capacity`` transitions and ``self._start`` points at
    the oldest one once the ring is full.  Logical index 0 is always the oldest transition.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
            raise ValueError(f"replay buffer capacity must be a positive int, got {capacity!r}")
        if capacity <= 0:
            raise ValueError(f"replay buffer capacity must be > 0, got {capacity}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self._items: list[Transition] = []
        self._start = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.num_added = 0  # total transitions ever added (evicted ones included)

    # ----------------------------------------------------------------------------------------------- contents
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> Transition:
        """Logical indexing: 0 is the oldest stored transition, -1 the newest."""
        n = len(self._items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a buffer of {n} transitions")
        return self._items[(self._start + (i % n)) % n]

    def __iter__(self) -> Iterator[Transition]:
        """Oldest first."""
        n = len(self._items)
        for i in range(n):
            yield self._items[(self._start + i) % n]

    def transitions(self) -> list[Transition]:
        """All stored transitions, oldest first."""
        return self._items[self._start:] + self._items[: self._start]

    def add(self, transitions: Iterable[Transition | Mapping[str, Any]]) -> None:
        """Append transitions (``Transition`` objects or dicts with the same keys), evicting the oldest."""
        if isinstance(transitions, (Transition, Mapping)):
            transitions = [transitions]
        for t in transitions:
            if not isinstance(t, Transition):
                if isinstance(t, Mapping):
                    t = Transition.from_mapping(t)
                else:
                    raise TypeError(f"expected a Transition or a mapping, got {type(t).__name__}")
            if len(self._items) < self.capacity:
                self._items.append(t)
            else:
                self._items[self._start] = t
                self._start = (self._start + 1) % self.capacity
            self.num_added += 1

    def clear(self) -> None:
        self._items = []
        self._start = 0

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_indices(self, n: int) -> list[int]:
        """``n`` logical indices (0 = oldest) drawn uniformly with replacement."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"sample size must be a non-negative int, got {n!r}")
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer: add transitions first")
        return self._rng.integers(0, len(self._items), size=int(n)).tolist()

    def sample(self, n: int) -> list[Transition]:
        """``n`` transitions drawn uniformly with replacement."""
        return [self[i] for i in self.sample_indices(n)]

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain python (JSON-able) snapshot: capacity, seed, transitions oldest first, RNG state."""
        return {
            "capacity": self.capacity,
            "seed": self.seed,
            "num_added": self.num_added,
            "transitions": [t.to_dict() for t in self.transitions()],
            "rng_state": _jsonable(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore contents, order and sampling state.

        The buffer keeps the capacity it was constructed with; if the snapshot holds more transitions than
        that, only the most recent ``capacity`` ones are kept.
        """
        for key in ("transitions", "rng_state"):
            if key not in state:
                raise ValueError(f"replay buffer state_dict is missing '{key}'")
        items = [t if isinstance(t, Transition) else Transition.from_mapping(t) for t in state["transitions"]]
        if len(items) > self.capacity:
            items = items[len(items) - self.capacity:]
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = _from_jsonable(state["rng_state"])
        self._items = items
        self._start = 0
        self._rng = rng
        self.seed = int(state.get("seed", self.seed))
        self.num_added = int(state.get("num_added", len(items)))


def _jsonable(obj: Any) -> Any:
    """numpy bit-generator state -> plain python (numpy ints become ints; PCG64 state is only ints/strs)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj
