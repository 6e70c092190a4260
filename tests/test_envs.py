"""Tests for the multi-turn text environments in ragen/env."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import generate_random_map
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

from ragen.env import (
    ENV_TYPES,
    BanditEnv,
    FrozenLakeEnv,
    SokobanCore,
    SokobanEnv,
    TextEnv,
    make_env,
    solve_sokoban,
)
from ragen.env.sokoban import parse_layout, render_room

ENV_CONFIGS = {
    "bandit": {},
    "frozenlake": {"size": 4, "p": 0.8, "is_slippery": False},
    "sokoban": {"dim_room": [6, 6], "num_boxes": 1, "max_steps": 100, "search_depth": 30},
}


def _first_valid(env: TextEnv) -> str:
    return env.valid_actions[0]


# --------------------------------------------------------------------------------------- make_env
def test_env_types_and_make_env_builds_each():
    assert ENV_TYPES == ("bandit", "frozenlake", "sokoban")
    expected = {"bandit": BanditEnv, "frozenlake": FrozenLakeEnv, "sokoban": SokobanEnv}
    for env_type in ENV_TYPES:
        env = make_env(env_type, ENV_CONFIGS[env_type])
        assert isinstance(env, TextEnv) and isinstance(env, expected[env_type])
        assert isinstance(make_env(env_type), expected[env_type])  # config optional
        assert isinstance(make_env(env_type, None), expected[env_type])


def test_make_env_unknown_type_names_allowed():
    with pytest.raises(ValueError, match="webshop") as e:
        make_env("webshop", {})
    for t in ENV_TYPES:
        assert t in str(e.value)


@pytest.mark.parametrize(
    "env_type,config,key",
    [
        ("bandit", {"arms": 3}, "arms"),
        ("frozenlake", {"map_size": 4}, "map_size"),
        ("sokoban", {"dim": [6, 6]}, "dim"),
        ("bandit", {"hi_arm_hiscore_prob": 1.5}, "hi_arm_hiscore_prob"),
        ("bandit", {"hi_arm_hiscore_prob": -0.1}, "hi_arm_hiscore_prob"),
        ("bandit", {"lo_arm_score": "a lot"}, "lo_arm_score"),
        ("bandit", {"hi_arm_name": "phoenix"}, "hi_arm_name"),
        ("bandit", {"lo_arm_name": ""}, "lo_arm_name"),
        ("frozenlake", {"size": 1}, "size"),
        ("frozenlake", {"size": 4.5}, "size"),
        ("frozenlake", {"p": 0.0}, "p"),
        ("frozenlake", {"p": 1.2}, "p"),
        ("frozenlake", {"is_slippery": "no"}, "is_slippery"),
        ("frozenlake", {"success_rate": 2.0}, "success_rate"),
        ("sokoban", {"dim_room": [2, 6]}, "dim_room"),
        ("sokoban", {"dim_room": 6}, "dim_room"),
        ("sokoban", {"num_boxes": 0}, "num_boxes"),
        ("sokoban", {"num_boxes": 20}, "num_boxes"),
        ("sokoban", {"max_steps": 0}, "max_steps"),
        ("sokoban", {"search_depth": True}, "search_depth"),
    ],
)
def test_make_env_bad_config_names_key(env_type, config, key):
    with pytest.raises(ValueError, match=key):
        make_env(env_type, config)


def test_make_env_unknown_key_lists_allowed_keys():
    with pytest.raises(ValueError) as e:
        make_env("sokoban", {"bogus": 1})
    for key in ("dim_room", "num_boxes", "max_steps", "search_depth"):
        assert key in str(e.value)


# --------------------------------------------------------------------------------------- common contract
@pytest.mark.parametrize("env_type", ENV_TYPES)
def test_reset_is_deterministic_and_seeds_differ(env_type):
    env = make_env(env_type, ENV_CONFIGS[env_type])
    other = make_env(env_type, ENV_CONFIGS[env_type])
    for seed in (0, 7, 123):
        assert env.reset(seed) == other.reset(seed) == env.reset(seed)
        assert env.render() == other.render()
    if env_type != "bandit":  # the bandit's start text is the same for every seed by design
        texts = {env.reset(seed) for seed in range(12)}
        assert len(texts) >= 8


@pytest.mark.parametrize("env_type", ENV_TYPES)
def test_same_seed_same_trajectory(env_type):
    a = make_env(env_type, ENV_CONFIGS[env_type])
    b = make_env(env_type, ENV_CONFIGS[env_type])
    rng = np.random.default_rng(0)
    for seed in range(5):
        a.reset(seed), b.reset(seed)
        for _ in range(6):
            act = a.valid_actions[int(rng.integers(len(a.valid_actions)))]
            ra, rb = a.step(act), b.step(act)
            assert ra[:3] == rb[:3] and ra[3]["success"] == rb[3]["success"]
            if ra[2]:
                break


@pytest.mark.parametrize("env_type", ENV_TYPES)
def test_instruction_and_observation(env_type):
    env = make_env(env_type, ENV_CONFIGS[env_type])
    assert env.instruction and len(env.instruction) < 400
    for name in env.valid_actions:
        assert name in env.instruction
    obs = env.reset(3)
    assert obs == env.render() and len(obs) < 200


@pytest.mark.parametrize("env_type", ENV_TYPES)
def test_invalid_action_leaves_state_unchanged(env_type):
    env = make_env(env_type, ENV_CONFIGS[env_type])
    obs = env.reset(11)
    for bad in ("jump", "", "Up Up", "<answer>Left</answer>", None):
        new_obs, reward, done, info = env.step(bad)
        assert new_obs == obs == env.render()
        assert reward == 0.0 and done is False
        assert info["action_is_valid"] is False and info["success"] is False


@pytest.mark.parametrize("env_type", ENV_TYPES)
def test_actions_are_case_insensitive_and_stripped(env_type):
    env = make_env(env_type, ENV_CONFIGS[env_type])
    ref = make_env(env_type, ENV_CONFIGS[env_type])
    for name in env.valid_actions:
        env.reset(5), ref.reset(5)
        out = env.step(f"  {name.upper()}\n")
        expected = ref.step(name)
        assert out[3]["action_is_valid"] is True
        assert out[0] == expected[0] and out[1] == expected[1] and out[2] == expected[2]
        env.reset(5)
        assert env.step(name.lower())[3]["action_is_valid"] is True


@pytest.mark.parametrize("env_type", ENV_TYPES)
def test_step_before_reset_and_after_done_raise(env_type):
    env = make_env(env_type, ENV_CONFIGS[env_type])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_first_valid(env))
    env.reset(0)
    done, info = False, {}
    rng = np.random.default_rng(1)
    for _ in range(500):
        _, _, done, info = env.step(env.valid_actions[int(rng.integers(len(env.valid_actions)))])
        assert isinstance(info["success"], bool) and isinstance(info["action_is_valid"], bool)
        if done:
            break
    assert done
    with pytest.raises(RuntimeError, match="ended"):
        env.step(_first_valid(env))
    with pytest.raises(RuntimeError):
        env.step("not an action")
    env.reset(0)  # a reset makes it usable again
    env.step(_first_valid(env))


# --------------------------------------------------------------------------------------- bandit
def test_bandit_expected_values_and_success():
    env = BanditEnv()
    assert env.valid_actions == ["Phoenix", "Dragon"]
    hi, lo = [], []
    for seed in range(2000):
        env.reset(seed)
        obs, r, done, info = env.step("dragon")
        assert done and info["success"] is True and info["arm"] == "Dragon" and r in (0.0, 1.0)
        assert "Dragon" in obs
        hi.append(r)
        env.reset(seed)
        _, r, done, info = env.step("Phoenix")
        assert done and info["success"] is False and info["arm"] == "Phoenix"
        lo.append(r)
    assert abs(np.mean(hi) - 0.5) < 0.05
    assert np.allclose(lo, 0.1)


def test_bandit_instruction_does_not_reveal_best_arm():
    env = BanditEnv()
    text = env.instruction.lower()
    assert "phoenix" in text and "dragon" in text
    for hint in ("0.5", "0.1", "1.0", "better", "best arm", "higher expected"):
        assert hint not in text


def test_bandit_custom_config_and_edge_probabilities():
    env = make_env("bandit", {"lo_arm_name": "Apple", "hi_arm_name": "Berry", "lo_arm_score": 0.2,
                              "hi_arm_score": 2, "hi_arm_hiscore_prob": 1.0})
    env.reset(0)
    assert env.step("berry")[1] == 2.0
    env = BanditEnv(hi_arm_hiscore_prob=0.0)  # hi arm never pays: the lo arm is now the better one
    env.reset(0)
    _, r, _, info = env.step("Dragon")
    assert r == 0.0 and info["success"] is False
    env.reset(0)
    assert env.step("Phoenix")[3]["success"] is True


def test_bandit_invalid_action_then_valid():
    env = BanditEnv()
    obs = env.reset(4)
    _, r, done, info = env.step("Unicorn")
    assert (r, done, info["action_is_valid"], info["arm"]) == (0.0, False, False, None)
    assert env.render() == obs
    assert env.step("Phoenix")[2] is True


# --------------------------------------------------------------------------------------- frozenlake
def test_frozenlake_check_env_on_wrapped_gym_env():
    env = FrozenLakeEnv(size=4)
    env.reset(2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*different from the unwrapped version.*")
        check_env(env.gym_env, skip_render_check=True)
    check_env(env.gym_env.unwrapped, skip_render_check=True)


def test_frozenlake_map_comes_from_seed():
    env = FrozenLakeEnv(size=5, p=0.7)
    env.reset(42)
    assert env.desc == list(generate_random_map(size=5, p=0.7, seed=42))
    rows = env.render().split("\n")
    assert len(rows) == 5 and all(len(r) == 5 for r in rows)
    assert set(env.render()) <= set("P_OG\n")
    assert env.render().count("P") == 1 and env.render().count("G") == 1
    assert env.gym_env.unwrapped.desc.shape == (5, 5)


def test_frozenlake_reaching_goal_on_hand_made_map():
    env = FrozenLakeEnv()
    assert env.load_map(["SFG", "FHF", "FFF"]) == "P_G\n_O_\n___"
    obs, r, done, info = env.step("Right")
    assert (obs, r, done, info["success"]) == ("_PG\n_O_\n___", 0.0, False, False)
    obs, r, done, info = env.step("right")
    assert obs == "__√\n_O_\n___"
    assert r == 1.0 and done is True and info["success"] is True and info["action_is_valid"] is True


def test_frozenlake_falling_into_hole():
    env = FrozenLakeEnv()
    env.load_map(["SFG", "FHF", "FFF"])
    env.step("Right")
    obs, r, done, info = env.step("Down")
    assert obs == "__G\n_X_\n___"
    assert r == 0.0 and done is True and info["success"] is False


def test_frozenlake_wall_bump_and_invalid_action():
    env = FrozenLakeEnv()
    env.load_map(["SFG", "FHF", "FFF"])
    obs, r, done, info = env.step("Up")  # off the map: gymnasium keeps the player in place
    assert obs == "P_G\n_O_\n___" and r == 0.0 and not done and info["action_is_valid"]
    obs, r, done, info = env.step("north")
    assert obs == "P_G\n_O_\n___" and not info["action_is_valid"]


def test_frozenlake_slippery_is_seed_reproducible():
    def trajectory(seed):
        env = FrozenLakeEnv(size=6, is_slippery=True, success_rate=0.5)
        out = [env.reset(seed)]
        for a in ["Right", "Down"] * 10:
            obs, _, done, _ = env.step(a)
            out.append(obs)
            if done:
                break
        return out

    assert trajectory(9) == trajectory(9)
    assert "slippery" in FrozenLakeEnv(is_slippery=True).instruction


# --------------------------------------------------------------------------------------- sokoban
def test_sokoban_core_passes_gymnasium_checker():
    check_env(SokobanCore(), skip_render_check=True)
    check_env(SokobanCore(dim_room=(7, 7), num_boxes=2, search_depth=40, render_mode="ansi"),
              skip_render_check=True)


def test_sokoban_core_observations():
    core = SokobanCore(dim_room=(6, 7), num_boxes=2, search_depth=40)
    obs, info = core.reset(seed=3)
    assert obs.shape == (6, 7) and core.observation_space.contains(obs)
    obs2, _ = core.reset(seed=3)
    assert np.array_equal(obs, obs2)
    assert info["num_boxes"] == 2 and info["boxes_on_target"] < 2 and info["success"] is False
    assert (obs[0] == 0).all() and (obs[-1] == 0).all() and (obs[:, 0] == 0).all() and (obs[:, -1] == 0).all()
    obs, reward, terminated, truncated, info = core.step(core.action_space.sample())
    assert core.observation_space.contains(obs) and isinstance(reward, float)
    with pytest.raises(ValueError):
        core.step(4)


def _play(env: SokobanEnv, actions: list[str]):
    total, out = 0.0, None
    for i, a in enumerate(actions):
        out = env.step(a)
        total += out[1]
        assert out[3]["action_is_valid"]
        assert out[2] == (i == len(actions) - 1)
    return out, total


@pytest.mark.parametrize(
    "config,seeds",
    [
        ({"dim_room": [6, 6], "num_boxes": 1, "search_depth": 30}, range(20)),
        ({"dim_room": [7, 7], "num_boxes": 2, "search_depth": 40}, range(4)),
        ({"dim_room": [8, 8], "num_boxes": 2, "search_depth": 60}, range(4)),
    ],
)
def test_generated_rooms_are_solvable(config, seeds):
    env = SokobanEnv(**config)
    for seed in seeds:
        env.reset(seed)
        room = env.gym_env.room_state
        assert (np.isin(room, (3, 4)).sum()) == config["num_boxes"]
        plan = solve_sokoban(room)
        assert plan, f"seed {seed}: no solution for\n{env.render()}"
        (obs, reward, done, info), _ = _play(env, plan)
        assert done and info["success"] is True
        assert reward == pytest.approx(-0.1 + 1.0 + 10.0)
        assert "X" not in obs


def test_sokoban_render_symbols():
    env = SokobanEnv()
    env.reset(0)
    text = env.render()
    rows = text.split("\n")
    assert len(rows) == 6 and all(len(r) == 6 for r in rows)
    assert set(text) <= set("#_O√XPS\n")
    assert text.count("P") + text.count("S") == 1
    assert rows[0] == "######" and rows[-1] == "######"


def test_sokoban_push_onto_target_and_finish_reward():
    env = SokobanEnv()
    assert env.load_layout("#######\n#PX_O_#\n#######") == "#######\n#PX_O_#\n#######"
    obs, r, done, info = env.step("Right")
    assert obs == "#######\n#_PXO_#\n#######" and r == pytest.approx(-0.1) and not done
    obs, r, done, info = env.step("Right")
    assert obs == "#######\n#__P√_#\n#######"
    assert r == pytest.approx(-0.1 + 1.0 + 10.0) and done and info["success"] is True


def test_sokoban_push_off_target_penalty_and_partial_progress():
    env = SokobanEnv()
    env.load_layout(["#######", "#P√___#", "#__XO_#", "#######"])
    obs, r, done, info = env.step("Right")  # box leaves its target
    assert r == pytest.approx(-0.1 - 1.0) and not done
    assert obs.split("\n")[1] == "#_SX__#" and info["boxes_on_target"] == 0
    obs, r, done, info = env.step("Down")
    assert r == pytest.approx(-0.1) and info["action_is_effective"]
    obs, r, done, info = env.step("Right")  # second box onto its target, first still off
    assert r == pytest.approx(-0.1 + 1.0) and not done and info["success"] is False
    assert obs == "#######\n#_OX__#\n#__P√_#\n#######"


def test_sokoban_blocked_moves_cost_step_penalty():
    env = SokobanEnv()
    env.load_layout("######\n#P_XX#\n#___O#\n#___O#\n######")
    before = env.render()
    obs, r, done, info = env.step("Up")  # wall
    assert obs == before and r == pytest.approx(-0.1) and info["action_is_effective"] is False
    env.step("Right")
    before = env.render()
    obs, r, done, info = env.step("Right")  # box into box
    assert obs == before and r == pytest.approx(-0.1) and not info["action_is_effective"]
    env.load_layout("#####\n#PX_#\n#__O#\n#####")
    env.step("Right")
    before = env.render()
    assert env.step("Right")[0] == before  # box against the wall cannot move


def test_sokoban_max_steps_truncates_without_success():
    env = SokobanEnv(max_steps=3)
    env.load_layout("#######\n#P_X_O#\n#######")
    assert env.step("Left")[2] is False
    assert env.step("bogus")[2] is False  # invalid actions do not count as steps
    assert env.step("Up")[2] is False
    obs, r, done, info = env.step("Left")
    assert done and info["success"] is False and info["truncated"] is True and r == pytest.approx(-0.1)
    with pytest.raises(RuntimeError):
        env.step("Right")


def test_sokoban_layout_validation():
    for bad in ("#####\n#P_O#\n#####",  # no box
                "#####\n#PXX#\n#O__#\n#####",  # boxes != targets
                "#####\n#_XO#\n#####",  # no player
                "#####\n#PXO_\n#####",  # open border
                "#####\n#PXQ#\n#####"):  # unknown symbol
        with pytest.raises(ValueError):
            parse_layout(bad)
    room = parse_layout("#####\n#SX_#\n#__√#\n#####")
    assert render_room(room) == "#####\n#SX_#\n#__√#\n#####"


def test_solver_edge_cases():
    assert solve_sokoban("#####\n#P√_#\n#####") == []
    assert solve_sokoban("#####\n#PO_#\n#__X#\n#####") is None  # box stuck in a corner
    assert solve_sokoban("######\n#P_XO#\n######") == ["Right", "Right"]


def test_sokoban_generation_failure_is_a_clear_error():
    core = SokobanCore(dim_room=(3, 6), num_boxes=1)  # a 1x4 corridor: no box can ever be pulled away
    with pytest.raises(RuntimeError, match="generator failed"):
        core.reset(seed=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), actions=st.lists(st.sampled_from(["Up", "Down", "Left", "Right"]), max_size=25))
def test_sokoban_random_play_invariants(seed, actions):
    env = SokobanEnv()
    env.reset(seed)
    n_walls = env.render().count("#")
    allowed = {-0.1, 0.9, -1.1, 10.9}
    for a in actions:
        obs, r, done, info = env.step(a)
        assert any(abs(r - v) < 1e-9 for v in allowed)
        assert obs.count("#") == n_walls
        assert obs.count("X") + obs.count("√") == 1
        assert obs.count("P") + obs.count("S") == 1
        if done:
            break
