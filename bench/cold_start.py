"""How often the embedded SmolLM2-135M answers in format, cold and with each of the config's ways in.

    python -m bench.cold_start                  # Bandit, 16 prompts, sampled at T = 1
    python -m bench.cold_start --tag FrozenLake --warmup-steps 8

Prints, per setting, the rate of well-formed answers, of valid actions and of success on held-out seeds:
(1) plain prompt, (2) assistant turn pre-filled with "<answer>", (3) pre-fill + the supervised format warm-up.
"""
from __future__ import annotations

import argparse
import os

from hydra import compose, initialize_config_dir

import ragen  # noqa: F401
from ragen.trainer.agent_trainer import AgentTrainer

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="Bandit", help="env tag from custom_envs")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=8)
    args = parser.parse_args()

    common = [f"es_manager.train.env_configs.tags=[{args.tag}]", f"es_manager.val.env_configs.tags=[{args.tag}]",
              "es_manager.train.env_groups=4", "es_manager.train.group_size=4",
              "es_manager.train.env_configs.n_groups=[4]",
              f"es_manager.val.env_groups={args.prompts}", f"es_manager.val.env_configs.n_groups=[{args.prompts}]",
              "agent_proxy.max_turn=1", "actor_rollout_ref.rollout.response_length=16",
              "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
              "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
              "ppo_mini_batch_size=16", "critic.enable=false", "archer.alpha=0", "trainer.logger=[console]",
              "trainer.default_local_dir=outputs/cold_start", "trainer.resume_mode=disable"]
    settings = [("plain prompt", ["agent_proxy.prefill_answer=false", "format_warmup.steps=0"]),
                ("pre-filled <answer>", ["agent_proxy.prefill_answer=true", "format_warmup.steps=0"]),
                (f"pre-fill + {args.warmup_steps} warm-up steps",
                 ["agent_proxy.prefill_answer=true", f"format_warmup.steps={args.warmup_steps}"])]
    rows = []
    with initialize_config_dir(config_dir=os.path.join(HERE, "config"), version_base=None):
        for name, extra in settings:
            cfg = compose("archer", overrides=common + ["agent_proxy.enable_think=false"] + extra)
            trainer = AgentTrainer(cfg)
            trainer.format_warmup()
            m = trainer.validate(0)
            rows.append((name, m["val/env/all/format_ok_rate"], m["val/env/all/valid_action_rate"],
                         m["val/env/all/success_rate"]))
    print(f"\n{args.tag}, {args.prompts} held-out prompts, sampled at T=1")
    print("| setting | well-formed | valid actions | success |\n|---|---:|---:|---:|")
    for name, fmt, valid, success in rows:
        print(f"| {name} | {fmt:.2f} | {valid:.2f} | {success:.2f} |")


if __name__ == "__main__":
    main()
