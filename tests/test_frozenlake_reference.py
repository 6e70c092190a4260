"""bench/frozenlake_reference.py: its vectorised FrozenLake agrees with the real env, its numbers by hand."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import generate_random_map

from bench import frozenlake_reference as ref
from ragen.env.frozenlake import FrozenLakeEnv

RING = ["SFF", "FHF", "FFG"]  # a hole in the middle: both staircases fall in, the edges reach the goal


def test_hand_checked_map():
    tiles = ref.encode_maps([RING])
    right_down, down_right = ref.staircase(2, 1, 4), ref.staircase(1, 2, 4)
    edge = np.array([2, 2, 1, 1])  # Right, Right, Down, Down
    assert ref.open_loop_success(tiles, np.stack([right_down, down_right, edge])).tolist() == [[0.0], [0.0], [1.0]]
    assert ref.shortest_path_length(tiles[0]) == 4
    assert ref.best_open_loop(tiles, 4)[0] == 1.0
    # uniform random within 4 actions: only the 2 edge routes of the 4^4 sequences reach the goal
    assert ref.uniform_random_success(tiles, 4) == pytest.approx(2 / 4 ** 4)


def test_vectorised_moves_match_the_real_env():
    rng = np.random.default_rng(0)
    descs = [generate_random_map(size=3, p=0.8, seed=s) for s in range(20)]
    sequences = rng.integers(0, 4, size=(30, 8))
    got = ref.open_loop_success(ref.encode_maps(descs), sequences)
    env = FrozenLakeEnv(size=3)
    for m, desc in enumerate(descs):
        for s, seq in enumerate(sequences):
            env.load_map(desc)
            success = False
            for a in seq:
                _, _, done, info = env.step(ref.ACTION_NAMES[a])
                success = info["success"]
                if done:
                    break
            assert got[s, m] == float(success), (desc, seq)


def test_uniform_random_equals_the_mean_over_every_sequence():
    descs = [generate_random_map(size=3, p=0.8, seed=s) for s in range(12)]
    tiles = ref.encode_maps(descs)
    every = np.array(list(itertools.product(range(4), repeat=5)))
    assert ref.uniform_random_success(tiles, 5) == pytest.approx(ref.open_loop_success(tiles, every).mean())
    best, seq = ref.best_open_loop(tiles, 5, chunk=100)  # chunked search finds the exhaustive maximum
    assert best == pytest.approx(ref.open_loop_success(tiles, every).mean(axis=1).max())
    assert ref.open_loop_success(tiles, seq[None]).mean() == pytest.approx(best)


def test_main_job_maps_and_budget(tmp_path):
    out = tmp_path / "ref.md"
    assert ref.main(["--set", "trainer.total_training_steps=2", "--set", "agent_proxy.max_turn=3",
                     "--out", str(out)]) == 0
    text = out.read_text()
    assert "within 6 actions" in text and "training (8 maps, 2 steps)" in text and "validation (32 maps)" in text
    with pytest.raises(SystemExit, match="is_slippery"):
        ref.main(["--set", "custom_envs.FrozenLake.env_config.is_slippery=true", "--out", str(out)])


def test_generations_of_a_map_blind_policy_replay_to_the_same_success(tmp_path, capsys):
    """Episodes that all walk Right, Right, Down, Down: one distinct sequence, and replaying it as a fixed route
    on the same maps gives exactly the episodes' success."""
    seeds = [123 + g for g in range(8)]
    tiles = ref.encode_maps([generate_random_map(size=3, p=0.8, seed=s) for s in seeds])
    route = np.array([2, 2, 1, 1])
    reached = ref.open_loop_success(tiles, route[None])[0]
    path = tmp_path / "step_10.jsonl"
    with open(path, "w") as fh:
        for seed, ok in zip(seeds, reached):
            turns = [{"obs": "", "reply": "", "actions": ["Right", "Right"], "reward": 0.0},
                     {"obs": "", "reply": "", "actions": ["Down", "Down"], "reward": float(ok)}]
            fh.write(json.dumps({"step": 10, "uid": f"val-step10-group0-seed{seed}", "env_tag": "FrozenLake",
                                 "success": bool(ok), "turns": turns}) + "\n")
    assert ref.main(["--generations", str(path)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "step_10" in line][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["8", f"{reached.mean():.3f}", "1", "`RRDD`", "8", f"{reached.mean():.3f}"]

    # two more episodes: one stopped after the route's first move (its start: on it), one walked elsewhere
    with open(path, "a") as fh:
        for seed, actions in ((131, ["Right"]), (132, ["Down", "Down", "Down"])):
            fh.write(json.dumps({"step": 10, "uid": f"val-step10-group0-seed{seed}", "env_tag": "FrozenLake",
                                 "success": False, "turns": [{"obs": "", "reply": "", "actions": actions,
                                                              "reward": 0.0}]}) + "\n")
    replay = ref.open_loop_success(ref.encode_maps([generate_random_map(size=3, p=0.8, seed=s)
                                                    for s in seeds + [131, 132]]), route[None]).mean()
    assert ref.main(["--generations", str(path)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "step_10" in line][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == ["10", f"{reached.sum() / 10:.3f}", "3", "`RRDD`", "9", f"{replay:.3f}"]
