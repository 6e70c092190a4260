"""A short ArCHer demo on CPU: train the embedded SmolLM2-135M on a text task, print validation success
before and after, and save a learning curve.

    python run_archer_example.py                       # Bandit: 8 format warm-up steps, then 8 ArCHer steps
    python run_archer_example.py --task frozenlake --steps 15
    python run_archer_example.py --set actor_rollout_ref.actor.optim.lr=2e-5   # any config override

Outputs go to ``outputs/archer_example/<task>/``: ``metrics.jsonl``, tensorboard events, checkpoints and
``learning_curve.png``.
"""
from __future__ import annotations

import argparse
import os
import time

from hydra import compose, initialize_config_dir

import ragen  # noqa: F401  (registers archer / bi_level_gae with veRL)
from ragen.trainer.agent_trainer import AgentTrainer

HERE = os.path.dirname(os.path.abspath(__file__))

# Per task: the environment tag and the settings that make a short CPU run meaningful.
TASKS = {
    "bandit": [
        "es_manager.train.env_configs.tags=[Bandit]", "es_manager.val.env_configs.tags=[Bandit]",
        "agent_proxy.max_turn=1",
        # every Bandit prompt is the same text, so greedy validation would score 0 or 1: sample instead and
        # report the rate at which the policy picks the better arm
        "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    ],
    "frozenlake": [
        "es_manager.train.env_configs.tags=[FrozenLake]", "es_manager.val.env_configs.tags=[FrozenLake]",
        "agent_proxy.max_turn=5", "custom_envs.FrozenLake.max_actions_per_traj=5",
    ],
}

DEMO = [
    "es_manager.train.env_groups=4", "es_manager.train.group_size=4", "es_manager.train.env_configs.n_groups=[4]",
    "es_manager.val.env_groups=32", "es_manager.val.group_size=1", "es_manager.val.env_configs.n_groups=[32]",
    "ppo_mini_batch_size=16", "micro_batch_size_per_gpu=8",
    "actor_rollout_ref.rollout.response_length=12",
    # short single-turn rows fit in memory: skip checkpointing's extra forward pass
    "actor_rollout_ref.model.enable_gradient_checkpointing=false",
    "actor_rollout_ref.actor.optim.lr=2e-5", "critic.optim.lr=1e-4",
    "archer.warmup_iters=1", "archer.critic.updates=50", "archer.critic.lr=3e-3",
    # pure utterance-level ArCHer (alpha = 0): the advantage is min(Q1,Q2) - min(V1,V2) of the utterance
    # critic, so the 135M-parameter token critic (the slowest part of a CPU step) is not needed
    "archer.alpha=0", "critic.enable=false",
    "trainer.logger=[console,tensorboard]", "trainer.resume_mode=disable",
]


def plot(history: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["train/env/all/success_rate"]) for h in history if "train/env/all/success_rate" in h]
    val = [(h["step"], h["val/env/all/success_rate"]) for h in history if "val/env/all/success_rate" in h]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if train:
        ax.plot(*zip(*train), marker=".", label="train rollouts (sampled)")
    if val:
        ax.plot(*zip(*val), marker="o", linewidth=2, label="validation (held-out seeds)")
    ax.set_xlabel("training step")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="bandit")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m", help="model_path: alias, HF directory or .gguf file")
    parser.add_argument("--out", default=None, help="output directory (default outputs/archer_example/<task>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args()

    out = os.path.abspath(args.out or os.path.join("outputs", "archer_example", args.task))
    overrides = DEMO + TASKS[args.task] + [
        f"model_path={args.model}", f"trainer.total_training_steps={args.steps}",
        f"trainer.test_freq={args.steps}", f"trainer.save_freq={args.steps}",
        f"trainer.default_local_dir={out}", "trainer.val_before_train=true",
    ] + list(args.set)
    with initialize_config_dir(config_dir=os.path.join(HERE, "config"), version_base=None):
        config = compose(config_name="archer", overrides=overrides)

    start = time.time()
    trainer = AgentTrainer(config)
    history = trainer.fit()
    minutes = (time.time() - start) / 60

    val = [h for h in history if "val/env/all/success_rate" in h]
    before, after = val[0], val[-1]
    png = os.path.join(out, "learning_curve.png")
    plot(history, png, f"ArCHer on {args.task} ({args.model})")
    print()
    print(f"task={args.task} model={args.model} steps={args.steps} wall={minutes:.1f} min")
    print(f"{'':28s}{'before':>10s}{'after':>10s}")
    for key, name in [("val/env/all/success_rate", "validation success rate"),
                      ("val/env/all/reward", "validation mean reward"),
                      ("val/env/all/format_ok_rate", "well-formed answers")]:
        print(f"{name:28s}{before.get(key, float('nan')):>10.3f}{after.get(key, float('nan')):>10.3f}")
    print(f"learning curve: {png}\nmetrics: {trainer.tracker.jsonl_path}")


if __name__ == "__main__":
    main()
