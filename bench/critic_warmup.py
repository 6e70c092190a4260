"""How many critic-only iterations does the utterance critic need before its advantages beat chance?

    python -m bench.critic_warmup                         # the main job's config, 8 critic-only iterations
    python -m bench.critic_warmup --iterations 10 --set archer.utterance_critic.updates=50

Runs the training loop of ``config/<--config>.yaml`` with the actor frozen (``archer.warmup_iters`` = all of
them) and, at every iteration, scores the critic on the NEW rollout before it sees it: for every turn of the
fresh episodes, the correlation between the critic's pessimistic Q(s_t, a_t) and the discounted return actually
observed from that turn on (G_t = sum_k gamma_h^k r_{t+k}), and between its advantage Q - V and G_t - V (what
the actor would be pushed by).  0 is chance; the first iterations' numbers say how long the warm-up should be.
Prints a markdown table and writes it to ``bench/results/critic_warmup.md``.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def returns_to_go(rewards: list[float], gamma: float) -> list[float]:
    out, running = [], 0.0
    for r in reversed(rewards):
        running = r + gamma * running
        out.append(running)
    return out[::-1]


def correlation(x: list[float], y: list[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.critic_warmup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="archer")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=os.path.join(HERE, "results", "critic_warmup.md"))
    args = p.parse_args(argv)

    from hydra import compose, initialize_config_dir

    import ragen  # noqa: F401
    from ragen.trainer.agent_trainer import AgentTrainer

    overrides = [f"archer.warmup_iters={args.iterations + 1}", "trainer.resume_mode=disable",
                 "trainer.default_local_dir=outputs/bench/critic_warmup", "trainer.logger=[]"] + args.set
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        config = compose(config_name=args.config, overrides=overrides)
    trainer = AgentTrainer(config)
    gamma = trainer.config.algorithm.high_level_gamma
    critic = trainer.utterance_critic
    rows: list[dict[str, float]] = []
    real_update = trainer.update_utterance_critic

    def scored_update(batch):
        """Score the critic on the rollout it has not seen yet, then train it as the trainer does."""
        obs, actions, returns = [], [], []
        for records in batch.non_tensor_batch["turn_records"]:
            obs += [r["obs"] for r in records]
            actions += [r["action"] for r in records]
            returns += returns_to_go([r["reward"] for r in records], gamma)
        q, v = critic.turn_values(obs, actions)
        q, v = q.tolist(), v.tolist()
        metrics = real_update(batch)
        rows.append({"turns": len(obs), "corr_q": correlation(q, returns),
                     "corr_adv": correlation([a - b for a, b in zip(q, v)], [g - b for g, b in zip(returns, v)]),
                     "td_loss": metrics.get("utterance_critic/loss", float("nan")),
                     "success": float(np.mean(batch.non_tensor_batch["episode_success"]))})
        return metrics

    trainer.update_utterance_critic = scored_update
    trainer.format_warmup()
    for step in range(args.iterations):
        trainer.train_step(step)
        r = rows[-1]
        print(f"iteration {step}: corr(Q, G) {r['corr_q']:.3f}  corr(A, G - V) {r['corr_adv']:.3f}  "
              f"TD loss {r['td_loss']:.4f}  ({r['turns']} turns)", flush=True)

    lines = [f"Critic-only iterations on `config/{args.config}.yaml` ({' '.join(args.set) or 'no overrides'}); "
             "each row scores the critic on a fresh rollout BEFORE training on it (0 = chance).", "",
             "| critic-only iterations before | turns scored | corr(Q, observed return) | corr(Q - V, return - V) | "
             "TD loss after | rollout success |", "|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows):
        lines.append(f"| {i} | {r['turns']} | {r['corr_q']:.3f} | {r['corr_adv']:.3f} | {r['td_loss']:.4f} | "
                     f"{r['success']:.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(f"`python -m bench.critic_warmup {' '.join(argv or sys.argv[1:])}`\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
