"""Train a multi-turn LLM agent.

    python train.py                                   # config/base.yaml
    python train.py --config-name archer              # config/archer.yaml (ArCHer, utterance critic)
    python train.py algorithm.adv_estimator=archer    # any key can be overridden on the command line
    python train.py --config-name archer_verl         # veRL's own trainer (main_ppo) with the ArCHer plugin
"""
from __future__ import annotations

from preload_tcmalloc import relaunch_with_tcmalloc

# before torch is imported: tcmalloc on CPU runs, not on GPU runs (trainer.device=cuda, or auto with a GPU);
# logs which allocator and why; RAGEN_ALLOCATOR=system|tcmalloc overrides (preload_tcmalloc.py)
relaunch_with_tcmalloc()

import hydra
from omegaconf import DictConfig

import ragen  # noqa: F401  (registers archer / bi_level_gae with veRL)
from ragen.config import ConfigError, load_config
from ragen.trainer.agent_trainer import AgentTrainer


@hydra.main(config_path="config", config_name="base", version_base=None)
def main(config: DictConfig) -> None:
    try:
        run = load_config(config)
        if run.trainer.backend == "verl":  # veRL's own trainer with the plugin (ragen.verl_plugin.launch)
            from ragen.verl_plugin import launch

            launch.run(run)
            return
        trainer = AgentTrainer(run)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    history = trainer.fit()
    val = [h for h in history if "val/env/all/success_rate" in h]
    if val:
        print(f"validation success: first {val[0]['val/env/all/success_rate']:.3f} "
              f"-> last {val[-1]['val/env/all/success_rate']:.3f} (metrics in {trainer.tracker.jsonl_path})")


if __name__ == "__main__":
    main()
