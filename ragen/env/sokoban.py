"""Sokoban: a small gymnasium core with our own room generator, plus a text wrapper.

Rooms are generated solvable by construction: carve a floor inside outer walls with a random walk, put
the boxes on their targets, then play *backwards* (the player walks and may pull a box behind it) for
``search_depth`` moves.  Every backward pull undone as a forward push solves the room, so the start state
is always solvable.

Cell codes (``SokobanCore`` observations) and text symbols:

====  ==================  ======
code  meaning             symbol
====  ==================  ======
0     wall                ``#``
1     empty floor         ``_``
2     target              ``O``
3     box on target       ``√``
4     box                 ``X``
5     player              ``P``
6     player on target    ``S``
====  ==================  ======
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .base import EnvConfig, TextEnv

__all__ = ["SokobanConfig", "SokobanCore", "SokobanEnv", "solve_sokoban", "parse_layout", "render_room"]

WALL, EMPTY, TARGET, BOX_ON_TARGET, BOX, PLAYER, PLAYER_ON_TARGET = range(7)
SYMBOLS = "#_O√XPS"  # indexed by cell code
_SYMBOL_TO_CODE = {s: i for i, s in enumerate(SYMBOLS)}

ACTIONS = ("Up", "Down", "Left", "Right")  # Discrete(4) ids 0..3
_DELTAS = ((-1, 0), (1, 0), (0, -1), (0, 1))

STEP_PENALTY = -0.1
BOX_ON_TARGET_REWARD = 1.0
BOX_OFF_TARGET_PENALTY = -1.0
FINISH_REWARD = 10.0

_MAX_GENERATION_TRIES = 200


def render_room(room_state: np.ndarray) -> str:
    """Rows of symbols, one line per row."""
    return "\n".join("".join(SYMBOLS[int(v)] for v in row) for row in np.asarray(room_state))


def parse_layout(layout: str | Sequence[str] | np.ndarray) -> np.ndarray:
    """Turn a layout (text using the render symbols, a list of row strings, or a 2-D array of cell codes)
    into a validated ``int`` room-state array: exactly one player, as many boxes as targets (>= 1)."""
    if isinstance(layout, np.ndarray) and layout.dtype.kind in "iu":
        room = layout.astype(np.int64)
        if room.ndim != 2 or room.min(initial=0) < 0 or room.max(initial=0) > 6:
            raise ValueError("Sokoban room array must be 2-D with codes in 0..6")
    else:
        rows = layout.splitlines() if isinstance(layout, str) else [str(r) for r in layout]
        rows = [r.strip() for r in rows if r.strip()]
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("Sokoban layout must be non-empty, rectangular rows of symbols")
        bad = set("".join(rows)) - set(SYMBOLS)
        if bad:
            raise ValueError(f"Sokoban layout has unknown symbols {sorted(bad)}; allowed: {' '.join(SYMBOLS)}")
        room = np.array([[_SYMBOL_TO_CODE[ch] for ch in r] for r in rows], dtype=np.int64)
    if room.shape[0] < 3 or room.shape[1] < 3:
        raise ValueError("Sokoban room must be at least 3x3")
    border = np.concatenate([room[0], room[-1], room[:, 0], room[:, -1]])
    if (border != WALL).any():
        raise ValueError("Sokoban room must be enclosed by walls (#) on its outer border")
    n_player = int(np.isin(room, (PLAYER, PLAYER_ON_TARGET)).sum())
    n_boxes = int(np.isin(room, (BOX, BOX_ON_TARGET)).sum())
    n_targets = int(np.isin(room, (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET)).sum())
    if n_player != 1:
        raise ValueError(f"Sokoban layout needs exactly one player, found {n_player}")
    if n_boxes < 1 or n_boxes != n_targets:
        raise ValueError(f"Sokoban layout needs as many boxes as targets (>= 1), found {n_boxes} and {n_targets}")
    return room


def _split(room: np.ndarray) -> tuple[np.ndarray, set[tuple[int, int]], tuple[int, int]]:
    """room state -> (fixed layer of WALL/EMPTY/TARGET, box positions, player position)."""
    fixed = np.where(np.isin(room, (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET)), TARGET, room)
    fixed = np.where(np.isin(fixed, (BOX, PLAYER)), EMPTY, fixed)
    boxes = {(int(r), int(c)) for r, c in zip(*np.nonzero(np.isin(room, (BOX, BOX_ON_TARGET))))}
    pr, pc = np.argwhere(np.isin(room, (PLAYER, PLAYER_ON_TARGET)))[0]
    return fixed, boxes, (int(pr), int(pc))


def _compose(fixed: np.ndarray, boxes: set[tuple[int, int]], player: tuple[int, int]) -> np.ndarray:
    room = fixed.copy()
    for r, c in boxes:
        room[r, c] = BOX_ON_TARGET if fixed[r, c] == TARGET else BOX
    room[player] = PLAYER_ON_TARGET if fixed[player] == TARGET else PLAYER
    return room


# ---------------------------------------------------------------------------------------------- generator
def _carve_floor(dim: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random-walk floor inside a one-cell wall border; covers about 60% of the interior."""
    h, w = dim
    fixed = np.full((h, w), WALL, dtype=np.int64)
    interior = (h - 2) * (w - 2)
    goal = max(2, int(round(0.6 * interior)))
    r, c = int(rng.integers(1, h - 1)), int(rng.integers(1, w - 1))
    fixed[r, c] = EMPTY
    d = int(rng.integers(4))
    carved = 1
    for _ in range(20 * interior):
        if carved >= goal:
            break
        if rng.random() < 0.35:
            d = int(rng.integers(4))
        dr, dc = _DELTAS[d]
        if 1 <= r + dr < h - 1 and 1 <= c + dc < w - 1:
            r, c = r + dr, c + dc
            if fixed[r, c] == WALL:
                fixed[r, c] = EMPTY
                carved += 1
        else:
            d = int(rng.integers(4))
    return fixed


def _displacement(boxes: set[tuple[int, int]], targets: set[tuple[int, int]]) -> int:
    """Sum over boxes of the Manhattan distance to the nearest target."""
    return sum(min(abs(br - tr) + abs(bc - tc) for tr, tc in targets) for br, bc in boxes)


def _reverse_play(
    fixed: np.ndarray, boxes: set[tuple[int, int]], player: tuple[int, int], depth: int, rng: np.random.Generator
) -> tuple[set[tuple[int, int]], tuple[int, int]]:
    """Walk backwards up to ``depth`` moves; a box right behind the player is pulled along (p=0.8).

    Returns the state along the walk whose boxes are farthest from the targets (latest on ties), so that
    a walk which wanders back towards the targets does not yield a trivial room.
    """
    targets = set(boxes)
    boxes = set(boxes)
    pr, pc = player
    best, best_score = (set(boxes), (pr, pc)), 0
    for _ in range(depth):
        options = [
            (dr, dc)
            for dr, dc in _DELTAS
            if fixed[pr + dr, pc + dc] != WALL and (pr + dr, pc + dc) not in boxes
        ]
        if not options:
            break
        dr, dc = options[int(rng.integers(len(options)))]
        behind = (pr - dr, pc - dc)
        if behind in boxes and rng.random() < 0.8:
            boxes.remove(behind)
            boxes.add((pr, pc))
        pr, pc = pr + dr, pc + dc
        score = _displacement(boxes, targets)
        if score >= best_score:
            best, best_score = (set(boxes), (pr, pc)), score
    return best


def generate_room(
    dim_room: tuple[int, int], num_boxes: int, search_depth: int, rng: np.random.Generator
) -> np.ndarray | None:
    """One generation attempt; ``None`` when it fails (too little floor, or no box left its target)."""
    fixed = _carve_floor(dim_room, rng)
    floor = [tuple(int(v) for v in rc) for rc in np.argwhere(fixed == EMPTY)]
    if len(floor) < num_boxes + 1:
        return None
    picks = rng.choice(len(floor), size=num_boxes + 1, replace=False)
    targets = {floor[i] for i in picks[:num_boxes]}
    player = floor[picks[num_boxes]]
    for t in targets:
        fixed[t] = TARGET
    boxes, player = _reverse_play(fixed, targets, player, search_depth, rng)
    if boxes <= targets:  # no box moved off its target: trivial room
        return None
    return _compose(fixed, boxes, player)


# ---------------------------------------------------------------------------------------------- solver
def solve_sokoban(room_state: np.ndarray | str | Sequence[str], max_states: int = 200_000) -> list[str] | None:
    """Shortest (in moves) solution by breadth-first search over (player, boxes) states.

    ``room_state`` is a room-code array or a text layout.  Returns the list of action names
    ("Up"/"Down"/"Left"/"Right"), ``[]`` if already solved, or ``None`` when no solution exists or none was
    found within ``max_states`` visited states.  Boxes pushed into a non-target corner are pruned.
    """
    room = parse_layout(room_state)
    fixed, boxes0, player0 = _split(room)
    h, w = fixed.shape
    walls = fixed == WALL
    targets = frozenset((int(r), int(c)) for r, c in np.argwhere(fixed == TARGET))

    def dead(cell: tuple[int, int]) -> bool:  # a box here can never move again and is not on a target
        if cell in targets:
            return False
        r, c = cell
        vert = walls[r - 1, c] or walls[r + 1, c] if 0 < r < h - 1 else True
        horiz = walls[r, c - 1] or walls[r, c + 1] if 0 < c < w - 1 else True
        return bool(vert and horiz)

    start = (player0, frozenset(boxes0))
    if start[1] == targets:
        return []
    parent: dict[Any, Any] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        (pr, pc), bx = state
        for a, (dr, dc) in enumerate(_DELTAS):
            nxt = (pr + dr, pc + dc)
            if walls[nxt]:
                continue
            nb = bx
            if nxt in bx:
                beyond = (nxt[0] + dr, nxt[1] + dc)
                if walls[beyond] or beyond in bx or dead(beyond):
                    continue
                nb = (bx - {nxt}) | {beyond}
            child = (nxt, nb)
            if child in parent:
                continue
            parent[child] = (state, a)
            if nb == targets:
                path = []
                node = child
                while parent[node] is not None:
                    node, act = parent[node]
                    path.append(ACTIONS[act])
                return path[::-1]
            if len(parent) >= max_states:
                return None
            queue.append(child)
    return None


# ---------------------------------------------------------------------------------------------- gym core
def _check_int(config: SokobanConfig, key: str, low: int) -> int:
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise config.error(key, f"an int >= {low}", value)
    return int(value)


@dataclass
class SokobanConfig(EnvConfig):
    """Sokoban's ``env_config``: room size, boxes, step limit and the reverse-play depth of the generator."""

    env_type: ClassVar[str] = "sokoban"
    dim_room: Sequence[int] = (6, 6)
    num_boxes: int = 1
    max_steps: int = 100
    search_depth: int = 30

    def __post_init__(self) -> None:
        try:
            dims = tuple(self.dim_room)
        except TypeError:
            dims = ()
        if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 3 for d in dims):
            raise self.error("dim_room", "two ints >= 3", self.dim_room)
        self.dim_room = (int(dims[0]), int(dims[1]))
        self.num_boxes = _check_int(self, "num_boxes", 1)
        if self.num_boxes + 1 > (self.dim_room[0] - 2) * (self.dim_room[1] - 2) // 2:
            raise ValueError(f"sokoban env_config['num_boxes']={self.num_boxes} is too many for "
                             f"dim_room={list(self.dim_room)}")
        self.max_steps = _check_int(self, "max_steps", 1)
        self.search_depth = _check_int(self, "search_depth", 1)


_DEFAULTS = SokobanConfig()


class SokobanCore(gym.Env):
    """Gymnasium Sokoban: ``Discrete(4)`` actions (Up, Down, Left, Right), observation = room codes.

    Rewards per step: -0.1; +1.0 per box pushed onto a target; -1.0 per box pushed off one; +10.0 when all
    boxes are on targets (``terminated``).  ``truncated`` once ``max_steps`` steps were taken.
    ``reset(options={"layout": ...})`` loads an explicit room (see :func:`parse_layout`) instead of generating
    one; the observation space follows the layout's shape.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        dim_room: Sequence[int] = _DEFAULTS.dim_room,
        num_boxes: int = _DEFAULTS.num_boxes,
        max_steps: int = _DEFAULTS.max_steps,
        search_depth: int = _DEFAULTS.search_depth,
        render_mode: str | None = None,
    ) -> None:
        config = SokobanConfig(dim_room, num_boxes, max_steps, search_depth)
        self.dim_room, self.num_boxes = config.dim_room, config.num_boxes
        self.max_steps, self.search_depth = config.max_steps, config.search_depth
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Box(low=0, high=6, shape=self.dim_room, dtype=np.uint8)
        self.fixed: np.ndarray | None = None
        self.boxes: set[tuple[int, int]] = set()
        self.player: tuple[int, int] = (0, 0)
        self.num_env_steps = 0

    # --------------------------------------------------------------- state
    @property
    def room_state(self) -> np.ndarray:
        if self.fixed is None:
            raise RuntimeError("SokobanCore: call reset() first")
        return _compose(self.fixed, self.boxes, self.player)

    def boxes_on_target(self) -> int:
        return sum(1 for b in self.boxes if self.fixed[b] == TARGET)

    def all_on_target(self) -> bool:
        return self.boxes_on_target() == len(self.boxes)

    def _obs(self) -> np.ndarray:
        return self.room_state.astype(np.uint8)

    def _info(self) -> dict[str, Any]:
        return {
            "boxes_on_target": self.boxes_on_target(),
            "num_boxes": len(self.boxes),
            "steps": self.num_env_steps,
            "success": self.all_on_target(),
        }

    def set_room(self, layout: str | Sequence[str] | np.ndarray) -> np.ndarray:
        """Load an explicit room and restart the step counter; returns the observation."""
        room = parse_layout(layout)
        self.fixed, self.boxes, self.player = _split(room)
        if room.shape != self.observation_space.shape:
            self.dim_room = (int(room.shape[0]), int(room.shape[1]))
            self.observation_space = spaces.Box(low=0, high=6, shape=self.dim_room, dtype=np.uint8)
        self.num_env_steps = 0
        return self._obs()

    # --------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if options and options.get("layout") is not None:
            return self.set_room(options["layout"]), self._info()
        base = int(self.np_random.integers(0, 2**63 - 1))
        for attempt in range(_MAX_GENERATION_TRIES):
            rng = np.random.default_rng([base, attempt])
            room = generate_room(self.dim_room, self.num_boxes, self.search_depth, rng)
            if room is not None:
                return self.set_room(room), self._info()
        raise RuntimeError(
            f"Sokoban generator failed {_MAX_GENERATION_TRIES} times for dim_room={list(self.dim_room)}, "
            f"num_boxes={self.num_boxes}, search_depth={self.search_depth}; use a larger room or fewer boxes"
        )

    def step(self, action: int):
        if self.fixed is None:
            raise RuntimeError("SokobanCore.step() called before reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"SokobanCore action must be an int in 0..3, got {action!r}")
        dr, dc = _DELTAS[int(action)]
        before = self.boxes_on_target()
        pr, pc = self.player
        nxt = (pr + dr, pc + dc)
        moved = False
        if self.fixed[nxt] != WALL:
            if nxt not in self.boxes:
                self.player, moved = nxt, True
            else:
                beyond = (nxt[0] + dr, nxt[1] + dc)
                if self.fixed[beyond] != WALL and beyond not in self.boxes:
                    self.boxes.remove(nxt)
                    self.boxes.add(beyond)
                    self.player, moved = nxt, True
        self.num_env_steps += 1
        after = self.boxes_on_target()
        reward = STEP_PENALTY
        if after > before:
            reward += BOX_ON_TARGET_REWARD * (after - before)
        elif after < before:
            reward += BOX_OFF_TARGET_PENALTY * (before - after)
        terminated = self.all_on_target()
        if terminated:
            reward += FINISH_REWARD
        truncated = (not terminated) and self.num_env_steps >= self.max_steps
        info = self._info()
        info["action_is_effective"] = moved
        return self._obs(), float(reward), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return render_room(self.room_state)
        return None


# ---------------------------------------------------------------------------------------------- text env
class SokobanEnv(TextEnv):
    """Text Sokoban over :class:`SokobanCore` (``self.gym_env``).

    ``info`` has ``success``, ``action_is_valid``, ``action_is_effective`` (the player moved),
    ``boxes_on_target`` and ``steps``.  A move into a wall is a valid action: it costs the step penalty.
    """

    config_class = SokobanConfig

    def __init__(self, config: SokobanConfig | None = None, **env_config: Any) -> None:
        self.config = config if config is not None else SokobanConfig(**env_config)
        c = self.config
        self.gym_env = SokobanCore(c.dim_room, c.num_boxes, c.max_steps, c.search_depth, render_mode="ansi")
        self._lookup = {name.lower(): i for i, name in enumerate(ACTIONS)}
        self.instruction = (
            "You are solving Sokoban. Push every box X onto a target O. You can push a box but never pull it, "
            "and you cannot walk through walls or boxes. "
            "Symbols: # wall, _ empty, O target, X box, √ box on target, P you, S you on a target. "
            "Valid actions: " + ", ".join(ACTIONS) + "."
        )
        self._started = False
        self._done = False

    @property
    def valid_actions(self) -> list[str]:
        return list(ACTIONS)

    def reset(self, seed: int | None = None) -> str:
        self.gym_env.reset(seed=seed)
        self._started, self._done = True, False
        return self.render()

    def load_layout(self, layout: str | Sequence[str] | np.ndarray) -> str:
        """Start an episode on an explicit room (text with the render symbols, or a code array)."""
        self.gym_env.reset(options={"layout": layout})
        self._started, self._done = True, False
        return self.render()

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if not self._started:
            raise RuntimeError("SokobanEnv.step() called before reset(seed)")
        if self._done:
            raise RuntimeError("SokobanEnv.step() called after the episode ended; call reset(seed) first")
        a = self._lookup.get(action.strip().lower()) if isinstance(action, str) else None
        if a is None:
            info = self.gym_env._info()
            info.update(action_is_valid=False, action_is_effective=False, truncated=False)
            return self.render(), 0.0, False, info
        _, reward, terminated, truncated, info = self.gym_env.step(a)
        self._done = bool(terminated or truncated)
        info["action_is_valid"] = True
        info["truncated"] = bool(truncated)
        return self.render(), reward, self._done, info

    def render(self) -> str:
        if not self._started:
            raise RuntimeError("SokobanEnv.render() called before reset(seed)")
        return render_room(self.gym_env.room_state)

    def close(self) -> None:
        self.gym_env.close()
