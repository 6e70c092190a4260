"""Which actions the main job's policy picks right after the format warm-up, per seed.

    python -m bench.warmup_actions --seeds 0 2                 # config/archer.yaml, 3 training rollouts per seed
    python -m bench.warmup_actions --seeds 2 --set format_warmup.steps=10

The format warm-up should teach the answer format and the action names, not a preference between actions: a
policy that leaves it choosing one direction rarely may never reach the goal, and then RL has nothing to learn
from.  For each seed (``seed.train`` as ``bench/sample_efficiency.py`` sets it) this builds the trainer, runs the
format warm-up, samples ``--rollouts`` training rollouts with the warmed-up policy (no update in between) and
prints each action's share of all actions and of the first action of a reply, and the sampled success rate.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def count_actions(trainer, rollouts: int) -> tuple[collections.Counter, collections.Counter, list[float]]:
    """(valid-named actions, the first of each reply, success rate per rollout) of ``rollouts`` training rollouts."""
    ctx = trainer.proxy.ctx
    # the envs' action names: an answer may name anything, and only choices between actions are counted
    names = {a for st in trainer.proxy.env_manager("train").envs for a in st.env.valid_actions}
    every, first, success = collections.Counter(), collections.Counter(), []
    for step in range(rollouts):
        batch = trainer.proxy.rollout("train", step)
        success.append(float(batch.meta_info["metrics"].get("env/all/success_rate", 0.0)))
        for records in batch.non_tensor_batch["turn_records"]:
            for record in records:  # one per turn: the reply text as the proxy parsed it
                actions = [a for a in ctx.parse_response(record["action"])[0] if a in names]
                every.update(actions)
                if actions:
                    first[actions[0]] += 1
    return every, first, success


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warmup_actions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="archer", help="config/<name>.yaml (default: the main job)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rollouts", type=int, default=3, help="training rollouts sampled after the warm-up")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args()

    from hydra import compose, initialize_config_dir

    import ragen  # noqa: F401  (registers the estimators)
    from ragen.trainer.agent_trainer import AgentTrainer

    print("| seed | rollouts | sampled success | share of all actions | share of first actions |")
    print("|---|---:|---:|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out, initialize_config_dir(os.path.join(ROOT, "config"),
                                                                         version_base=None):
            config = compose(config_name=args.config, overrides=[
                f"seed.train={10000 + 100000 * seed}", f"trainer.default_local_dir={out}", "trainer.logger=[console]",
                "trainer.resume_mode=disable", "trainer.save_freq=0", "trainer.test_freq=0",
                "trainer.val_before_train=false"] + args.set)
            trainer = AgentTrainer(config)
            trainer.format_warmup()
            every, first, success = count_actions(trainer, args.rollouts)

        def shares(counter: collections.Counter) -> str:
            total = max(1, sum(counter.values()))
            return ", ".join(f"{a} {100 * n / total:.0f} %" for a, n in sorted(counter.items()))

        print(f"| {seed} | {args.rollouts} | {sum(success) / len(success):.3f} | {shares(every)} | {shares(first)} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
