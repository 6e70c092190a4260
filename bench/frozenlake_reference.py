"""What policies that ignore the map, and one that reads it, score on the main job's FrozenLake maps.

    python -m bench.frozenlake_reference                  # config/archer.yaml: its 32 validation maps and
                                                          # the training maps of its 20 steps

Every map of ``generate_random_map`` starts at the top-left corner and has its goal at the bottom-right one, so
an agent that never looks at the map can still reach the goal on many maps by walking a fixed route.  This
script says how many, exactly, for the maps a run of the config sees, within its action budget
(``agent_proxy.max_turn`` x ``max_actions_per_turn``, capped by ``max_actions_per_traj``):

* ``uniform random``: every action uniformly at random (exact, by dynamic programming over positions);
* ``best fixed route``: the best open-loop action sequence of the budget's length for this set of maps, found by
  trying every one of them (4^budget), and the two staircases Right/Down and Down/Right;
* ``reads the map``: a shortest path on each map (gymnasium guarantees one exists).

A greedy validation score at the best fixed route's level is what a map-blind policy can reach; only a policy
that reads the map goes above it.  Prints a markdown table and writes it to
``bench/results/frozenlake_reference.md``.

    python -m bench.frozenlake_reference --generations RUN_DIR/val_generations/step_10.jsonl [...]

instead reads validation episodes a run wrote (``trainer.log_val_generations``) and says whether the policy
read the maps: its success, how many different action sequences it walked, how many episodes walked the most
common one (or its start, until a hole ended them), and that sequence's success replayed as a fixed route on
the same maps (all episodes on it and equal success: nothing the policy did depended on the map).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import deque

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# gymnasium's action ids (ragen.env.frozenlake uses the same order): Left, Down, Right, Up
ACTION_NAMES = ("Left", "Down", "Right", "Up")
MOVES = np.array([(0, -1), (1, 0), (0, 1), (-1, 0)])
FROZEN, HOLE, GOAL = 0, 1, 2


def encode_maps(descs: list[list[str]]) -> np.ndarray:
    """[M, n, n] tile codes (FROZEN for S and F, HOLE, GOAL) of gymnasium maps given as rows of letters."""
    code = {"S": FROZEN, "F": FROZEN, "H": HOLE, "G": GOAL}
    return np.array([[[code[ch] for ch in row] for row in desc] for desc in descs], dtype=np.int8)


def step_positions(tiles: np.ndarray, rows: np.ndarray, cols: np.ndarray, action: np.ndarray,
                   alive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One deterministic FrozenLake move for many (sequence, map) pairs at once.

    tiles [M, n, n]; rows, cols, alive [S, M] (alive: neither in a hole nor on the goal yet); action [S] ids.
    A move into a wall stays put.  Returns the new rows, cols, alive and a [S, M] flag "on the goal now".
    """
    n = tiles.shape[1]
    dr, dc = MOVES[action, 0][:, None], MOVES[action, 1][:, None]
    new_r = np.where(alive, np.clip(rows + dr, 0, n - 1), rows)
    new_c = np.where(alive, np.clip(cols + dc, 0, n - 1), cols)
    tile = tiles[np.arange(tiles.shape[0])[None, :], new_r, new_c]
    at_goal = tile == GOAL
    return new_r, new_c, alive & (tile == FROZEN), at_goal


def open_loop_success(tiles: np.ndarray, sequences: np.ndarray) -> np.ndarray:
    """[S, M] 1.0 where action sequence s (``sequences`` [S, L] ids) reaches map m's goal, else 0."""
    S, M = sequences.shape[0], tiles.shape[0]
    rows = np.zeros((S, M), dtype=np.int64)
    cols = np.zeros((S, M), dtype=np.int64)
    alive = np.ones((S, M), dtype=bool)
    reached = np.zeros((S, M), dtype=bool)
    for t in range(sequences.shape[1]):
        rows, cols, alive, at_goal = step_positions(tiles, rows, cols, sequences[:, t], alive)
        reached |= at_goal
    return reached.astype(np.float64)


def best_open_loop(tiles: np.ndarray, length: int, chunk: int = 1 << 16) -> tuple[float, np.ndarray]:
    """The best mean success over the maps among all 4^length action sequences, and one sequence reaching it."""
    best, best_seq = -1.0, np.zeros(length, dtype=np.int64)
    total = 4 ** length
    digits = 4 ** np.arange(length - 1, -1, -1)
    for start in range(0, total, chunk):  # ties: the first in lexicographic order of (L, D, R, U)
        index = np.arange(start, min(total, start + chunk))
        sequences = (index[:, None] // digits[None, :]) % 4
        scores = open_loop_success(tiles, sequences).mean(axis=1)
        i = int(np.argmax(scores))
        if scores[i] > best:
            best, best_seq = float(scores[i]), sequences[i]
    return best, best_seq


def uniform_random_success(tiles: np.ndarray, length: int) -> float:
    """Exact mean success of a uniformly random action at every step, over the maps (DP over positions)."""
    M, n, _ = tiles.shape
    prob = np.zeros((M, n, n))
    prob[:, 0, 0] = 1.0
    success = np.zeros(M)
    for _ in range(length):
        nxt = np.zeros_like(prob)
        for dr, dc in MOVES:
            shifted = np.zeros_like(prob)
            for r in range(n):
                for c in range(n):
                    nr, nc = min(max(r + dr, 0), n - 1), min(max(c + dc, 0), n - 1)
                    shifted[:, nr, nc] += prob[:, r, c]
            nxt += shifted / 4.0
        success += (nxt * (tiles == GOAL)).sum(axis=(1, 2))
        prob = nxt * (tiles == FROZEN)  # holes and the goal end the episode
    return float(success.mean())


def shortest_path_length(tile: np.ndarray) -> int | None:
    """Moves from the top-left corner to the goal over frozen tiles (BFS), None when there is no path."""
    n = tile.shape[0]
    seen, queue = {(0, 0): 0}, deque([(0, 0)])
    while queue:
        r, c = queue.popleft()
        if tile[r, c] == GOAL:
            return seen[(r, c)]
        for dr, dc in MOVES:
            nr, nc = r + int(dr), c + int(dc)
            if 0 <= nr < n and 0 <= nc < n and (nr, nc) not in seen and tile[nr, nc] != HOLE:
                seen[(nr, nc)] = seen[(r, c)] + 1
                queue.append((nr, nc))
    return None


def staircase(first: int, second: int, length: int) -> np.ndarray:
    return np.array([[first, second][t % 2] for t in range(length)], dtype=np.int64)


def seed_of(uid: str) -> int:
    """The env seed in a rollout uid (``ragen.llm_agent.es_manager``: ``<mode>-step<k>-group<g>-seed<seed>``)."""
    tail = uid.rsplit("-seed", 1)
    if len(tail) != 2 or not tail[1].isdigit():
        raise ValueError(f"uid {uid!r} does not end in -seed<N>")
    return int(tail[1])


def maps_of(env, seeds: list[int]) -> list[list[str]]:
    """The map ``env`` (a FrozenLake ``TextEnv``) draws for each seed: its own ``reset``, not a second copy."""
    maps = []
    for seed in seeds:
        env.reset(seed)
        maps.append(list(env.desc))
    return maps


def generations_row(path: str, env, budget: int) -> list[str]:
    """One table row for a ``val_generations/step_<k>.jsonl`` file of FrozenLake episodes."""
    with open(path, encoding="utf-8") as fh:
        episodes = [json.loads(line) for line in fh if line.strip()]
    episodes = [e for e in episodes if e["env_tag"] == "FrozenLake"]
    if not episodes:
        raise SystemExit(f"{path}: no FrozenLake episodes")
    index = {name: i for i, name in enumerate(ACTION_NAMES)}
    routes = [tuple(index[a] for t in e["turns"] for a in t["actions"] if a in index) for e in episodes]
    common = max(set(routes), key=routes.count)
    tiles = encode_maps(maps_of(env, [seed_of(e["uid"]) for e in episodes]))
    replay = open_loop_success(tiles, np.array([common[:budget]])).mean() if common else 0.0
    success = np.mean([e["success"] for e in episodes])
    route = "".join(ACTION_NAMES[a][0] for a in common) or "(none)"
    on_it = sum(r == common[:len(r)] for r in routes)  # the route itself, or its start when a hole ended it
    return [f"`{path}`", str(len(episodes)), f"{success:.3f}", str(len(set(routes))), f"`{route}`",
            str(on_it), f"{replay:.3f}"]


def map_sets(config) -> dict[str, list[list[str]]]:
    """The FrozenLake maps a run of ``config`` validates on (every time) and trains on (all its steps), with
    the run's own seeding (``EnvStateManager.group_seed``) and map generation (the env's ``reset``)."""
    from ragen.llm_agent.es_manager import EnvStateManager

    out = {}
    for mode, steps in (("val", 1), ("train", config.trainer.total_training_steps)):
        tags = list(getattr(config.es_manager, mode).env_configs.tags)
        if tags != ["FrozenLake"]:
            raise SystemExit(f"es_manager.{mode}.env_configs.tags must be [FrozenLake] for this bench, got {tags}")
        esm = EnvStateManager.for_run(config, mode)
        seeds = [esm.group_seed(step, g) for step in range(steps) for g in range(esm.env_groups)]
        label = f"validation ({len(seeds)} maps)" if mode == "val" else f"training ({len(seeds)} maps, {steps} steps)"
        out[label] = maps_of(esm.envs[0].env, seeds)
    return out


def action_budget(config) -> int:
    proxy = config.agent_proxy
    budget = proxy.max_turn * proxy.max_actions_per_turn
    cap = config.custom_envs["FrozenLake"].max_actions_per_traj
    return min(budget, cap) if cap else budget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frozenlake_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="archer", help="config/<name>.yaml (default: the main job's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Hydra override (repeatable)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "frozenlake_reference.md"))
    p.add_argument("--generations", nargs="+", metavar="JSONL",
                   help="val_generations/step_<k>.jsonl files of runs of this config: analyse them instead "
                        "(prints only)")
    args = p.parse_args(argv)

    from hydra import compose, initialize_config_dir

    from ragen.config import load_config

    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        config = load_config(compose(config_name=args.config, overrides=args.set))
    if config.custom_envs["FrozenLake"].env_config.get("is_slippery", False):
        raise SystemExit("custom_envs.FrozenLake.env_config.is_slippery is true: this bench models deterministic "
                         "moves only (allowed: false)")
    budget = action_budget(config)
    if args.generations:
        from ragen.env import make_env

        spec = config.custom_envs["FrozenLake"]
        env = make_env(spec.env_type, dict(spec.env_config))
        table = ["| file | episodes | success | distinct action sequences | most common | episodes that walked "
                 "it (or its start, until a hole) | its success as a fixed route on the same maps |",
                 "|---|---:|---:|---:|---|---:|---:|"]
        table += ["| " + " | ".join(generations_row(f, env, budget)) + " |" for f in args.generations]
        print("\n".join(table))
        return 0
    sets = {name: encode_maps(descs) for name, descs in map_sets(config).items()}
    names = list(sets)
    rows = []
    rows.append(["uniform random"] + [f"{uniform_random_success(t, budget):.3f}" for t in sets.values()])
    for first, second in ((2, 1), (1, 2)):
        seq = staircase(first, second, budget)
        label = f"staircase {ACTION_NAMES[first]}, {ACTION_NAMES[second]}, ..."
        rows.append([label] + [f"{open_loop_success(t, seq[None]).mean():.3f}" for t in sets.values()])
    for name, tiles in sets.items():
        score, seq = best_open_loop(tiles, budget)
        route = "".join(ACTION_NAMES[a][0] for a in seq)
        cells = [f"**{score:.3f}**" if other == name else
                 f"{open_loop_success(sets[other], seq[None]).mean():.3f}" for other in names]
        rows.append([f"best fixed route for the {name.split(' ')[0]} maps (`{route}`)"] + cells)
    reads = []
    for tiles in sets.values():
        lengths = [shortest_path_length(t) for t in tiles]
        reads.append(f"{np.mean([n is not None and n <= budget for n in lengths]):.3f}")
    rows.append(["reads the map (a shortest path)"] + reads)

    header = (f"FrozenLake reference policies on `config/{args.config}.yaml`'s maps "
              f"({' '.join(args.set) or 'no overrides'}): success rate within {budget} actions, "
              f"deterministic moves, start top-left, goal bottom-right; routes in letters (L = Left, D = Down, "
              f"R = Right, U = Up; a move into the edge stays put).\n\n"
              f"`python -m bench.frozenlake_reference{' --config ' + args.config if args.config != 'archer' else ''}"
              f"{''.join(' --set ' + s for s in args.set)}`\n")
    table = ["| policy | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    text = header + "\n" + "\n".join(table) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
