"""Write the parquet files veRL's ``data.train_files`` / ``data.val_files`` expect, one row per episode.

    python -m ragen.verl_plugin.dataset --config-name archer --out data/frozenlake [hydra overrides ...]

The same Hydra configs as ``train.py`` (``config/*.yaml``) decide the environments: training rows walk the local
backend's seeds (``seed.train + step * env_groups + group`` for every step of ``trainer.total_training_steps``),
validation rows are the held-out ``seed.val + group``.  Each row is in veRL's ``RLHFDataset`` format: ``prompt``
(the first turn's chat messages, so veRL's length filter sees the real prompt), ``data_source``, ``agent_name``
(``ragen_env``, the plugin's agent loop), ``reward_model`` and ``extra_info`` (``index``, ``seed``, ``env_tag``
and, as JSON, the settings the agent loop needs).  It prints the veRL keys that match the config: the batch
(``data.train_batch_size`` = env groups, ``actor_rollout_ref.rollout.n`` = group size), the model directory, and
the prompt / response lengths an episode can reach.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir

from ragen.config import RunConfig, load_config
from ragen.llm_agent.ctx_manager import ContextManager
from ragen.llm_agent.es_manager import EnvStateManager
from ragen.models import load_tokenizer, resolve_model_path
from ragen.verl_plugin.agent_loop import AGENT_NAME

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
# a user message after a turn: reward line, status, the board, the reminder (FrozenLake 3x3: ~60 tokens); the
# printed response length budgets this per turn on top of the reply cap
_USER_MESSAGE_TOKENS = 160


def episode_settings(run: RunConfig, tag: str) -> dict[str, Any]:
    """What the agent loop needs of the run config for one env tag (serialised into each row)."""
    return {
        "env_tag": tag,
        "agent_proxy": dataclasses.asdict(run.agent_proxy),
        "format_penalty": run.es_manager.format_penalty,
        "env": dataclasses.asdict(run.custom_envs[tag]),
        "reply_tokens": run.actor_rollout_ref.rollout.response_length,
    }


def build_rows(run: RunConfig, mode: str, ctx: ContextManager) -> tuple[list[dict[str, Any]], int]:
    """One row per env group and step (train) or per env group (val), in the local backend's seed order; and the
    longest first prompt in tokens."""
    esm = EnvStateManager.for_run(run, mode)
    steps = run.trainer.total_training_steps if mode == "train" else 1
    rows, longest = [], 0
    for step in range(steps):
        for group, tag in enumerate(esm.group_tags):
            seed = esm.group_seed(step, group)
            state = esm.reset_env(group * esm.group_size, seed, uid=esm.group_uid(step, group))
            dialogue = ctx.start(state.instruction, state.obs, state.actions_left)
            longest = max(longest, len(dialogue.input_ids))
            messages = dialogue.messages
            rows.append({
                "data_source": f"ragen/{tag}",
                "agent_name": AGENT_NAME,
                "prompt": messages,
                "ability": "agent",
                "reward_model": {"style": "rule", "ground_truth": ""},
                "extra_info": {"index": len(rows), "seed": seed, "env_tag": tag, "split": mode,
                               "ragen": json.dumps(episode_settings(run, tag), sort_keys=True)},
            })
    return rows, longest


def write_dataset(config: Any, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``train.parquet`` and ``val.parquet`` under ``out_dir``; returns the veRL keys that go with them."""
    run = load_config(config)
    tokenizer = load_tokenizer(run.actor_rollout_ref.model.path)
    ctx = ContextManager(run.agent_proxy, tokenizer)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lengths = {}
    for mode in ("train", "val"):
        rows, lengths[mode] = build_rows(run, mode, ctx)
        pd.DataFrame(rows).to_parquet(out / f"{mode}.parquet")
    turns = run.agent_proxy.max_turn
    per_turn = run.actor_rollout_ref.rollout.response_length + 1 + _USER_MESSAGE_TOKENS
    return {
        "data.train_files": str(out / "train.parquet"),
        "data.val_files": str(out / "val.parquet"),
        "data.train_batch_size": run.es_manager.train.env_groups,
        "actor_rollout_ref.rollout.n": run.es_manager.train.group_size,
        "data.max_prompt_length": max(lengths.values()),
        "data.max_response_length": turns * per_turn,
        "actor_rollout_ref.model.path": str(resolve_model_path(run.actor_rollout_ref.model.path)),
        "trainer.total_training_steps": run.trainer.total_training_steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default="base", help="a config/*.yaml name (default: base)")
    parser.add_argument("--config-path", default=str(CONFIG_DIR),
                        help="the folder of the Hydra configs (default: this checkout's config/)")
    parser.add_argument("--out", required=True, help="directory for train.parquet and val.parquet")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args(argv)
    if not Path(args.config_path, f"{args.config_name}.yaml").is_file():
        parser.error(f"no {args.config_name}.yaml in --config-path {args.config_path} (a wheel install carries no "
                     "config/: pass the repository's config folder)")
    with initialize_config_dir(config_dir=str(Path(args.config_path).resolve()), version_base=None):
        config = compose(config_name=args.config_name, overrides=args.overrides)
    keys = write_dataset(config, args.out)
    print(f"wrote {keys['data.train_files']} and {keys['data.val_files']}; veRL keys for this dataset:")
    print(" ".join(f"{k}={v}" for k, v in keys.items()))


if __name__ == "__main__":
    main()
