"""Sample efficiency of the advantage estimators: validation success against environment steps.

    python -m bench.sample_efficiency --tasks frozenlake sokoban --seeds 3      # the full benchmark
    python -m bench.sample_efficiency --quick                                   # tiny smoke run (~1 min)
    python -m bench.sample_efficiency --tasks bandit --seeds 2                  # quick sanity check
    python -m bench.sample_efficiency --report-only                             # re-plot / re-summarise
    python -m bench.sample_efficiency --tasks frozenlake --estimators archer_utterance archer_logged archer_paper
    # a real LLM: each run is the main job (config/archer.yaml) with the estimator and seed changed
    BENCH_THREADS=1 python -m bench.sample_efficiency --policy smollm2-135m --tasks frozenlake \
        --estimators archer_utterance gae grpo --seeds 2 --tag _smollm2

Every run trains through the project's own trainer (``ragen.trainer.agent_trainer.AgentTrainer`` on a
Hydra-composed ``config/base.yaml`` + the overrides below: agent proxy, loss masks, estimators, workers),
with the SAME rollout budget and settings for every estimator; only ``algorithm.adv_estimator`` (and, for
ArCHer, ``archer.value_model``) differ.  Estimators:

* ``archer_utterance`` - archer, utterance-level double Q/V critic (``archer.value_model=utterance``), V targets
  from the current policy (the default ``archer.utterance_critic.v_target=policy``)
* ``archer_logged``    - the same with ``archer.utterance_critic.v_target=logged`` (SARSA on the replay mixture)
* ``archer_paper``     - the authors' choices of ``config/archer_paper.yaml`` (its algorithm / archer / critic /
  actor keys; the learning rate stays the small policy's)
* ``archer_token``     - archer, Q/V from the token critic (``archer.value_model=token``)
* ``gae``, ``grpo``, ``bi_level_gae``

The policy is the small from-scratch Llama of ``bench/small_policy.py`` (word-level tokenizer, ChatML
template), format-warmed-up ONCE per task on uniformly random valid actions and saved under
``<runs>/policies/<task>``; every run loads it with ``model_path=<dir>``.

Raw runs go to ``--runs`` (default ``outputs/bench/sample_efficiency``, not in git): each run is a subprocess
(1 torch thread; ``--workers`` of them at a time) that writes ``<runs>/runs<tag>/<task>/<estimator>/seed<k>.json``;
runs whose file exists are skipped (resumable).  Summaries go to ``--results`` (default ``bench/results``):
``sample_efficiency<tag>.csv`` (every point: task, estimator, seed, step, cumulative env steps, elapsed wall
seconds, validation / train success), ``<task><tag>.png`` (mean +- min/max over seeds vs env steps and wall
seconds) and ``summary<tag>.md`` (env steps to the success threshold, final success).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join(ROOT, "outputs", "bench", "sample_efficiency")


def preset_overrides(name: str,
                     sections: tuple[str, ...] = ("algorithm", "archer", "critic", "actor_rollout_ref.actor"),
                     skip: tuple[str, ...] = ("actor_rollout_ref.actor.optim",)) -> list[str]:
    """The keys a preset in config/ sets under ``sections`` (not ``skip``), as command-line overrides."""
    from omegaconf import OmegaConf

    flat: list[str] = []

    def walk(node, path: str) -> None:
        if OmegaConf.is_dict(node):
            for k, v in node.items():
                if k != "defaults":
                    walk(v, f"{path}.{k}" if path else str(k))
        elif path.startswith(sections) and not path.startswith(skip):
            flat.append(f"{path}={'null' if node is None else str(node).lower() if isinstance(node, bool) else node}")

    walk(OmegaConf.load(os.path.join(ROOT, "config", f"{name}.yaml")), "")
    return flat


ESTIMATORS: dict[str, list[str]] = {
    "archer_utterance": ["algorithm.adv_estimator=archer", "archer.value_model=utterance"],
    "archer_logged": ["algorithm.adv_estimator=archer", "archer.value_model=utterance",
                      "archer.utterance_critic.v_target=logged"],
    "archer_paper": ["algorithm.adv_estimator=archer"] + preset_overrides("archer_paper"),
    "archer_token": ["algorithm.adv_estimator=archer", "archer.value_model=token"],
    "gae": ["algorithm.adv_estimator=gae"],
    "grpo": ["algorithm.adv_estimator=grpo"],
    "bi_level_gae": ["algorithm.adv_estimator=bi_level_gae"],
}

# per task: env tag, env type (warm-up actions), task-specific overrides, success threshold, train steps
TASKS: dict[str, dict[str, Any]] = {
    "frozenlake": {
        "tag": "FrozenLake", "env_type": "frozenlake", "threshold": 0.3, "steps": 60,
        "overrides": ["agent_proxy.max_turn=6", "custom_envs.FrozenLake.max_actions_per_traj=6",
                      "custom_envs.FrozenLake.env_config.size=3", "custom_envs.FrozenLake.env_config.p=0.8",
                      "custom_envs.FrozenLake.env_config.is_slippery=false"],
    },
    "sokoban": {
        "tag": "SimpleSokoban", "env_type": "sokoban", "threshold": 0.3, "steps": 80,
        "overrides": ["agent_proxy.max_turn=5", "custom_envs.SimpleSokoban.max_actions_per_traj=5",
                      "custom_envs.SimpleSokoban.env_config.dim_room=[6,6]",
                      "custom_envs.SimpleSokoban.env_config.num_boxes=1",
                      "custom_envs.SimpleSokoban.env_config.search_depth=30", "trainer.test_freq=10"],
    },
    "bandit": {
        "tag": "Bandit", "env_type": "bandit", "threshold": 0.9, "steps": 15,
        "overrides": ["agent_proxy.max_turn=1",
                      # every Bandit prompt is identical: greedy validation would be all-or-nothing, so sample
                      "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
                      "actor_rollout_ref.rollout.val_kwargs.temperature=1.0"],
    },
}

# the same for every estimator, task and seed
SHARED = [
    # 16 episodes per step in 4 mini-batches x 2 epochs = 8 optimizer steps per rollout (round 3; rounds 1-2 took
    # ONE step per rollout, which left the policy nearly where it started)
    "micro_batch_size_per_gpu=4", "ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_epochs=2", "critic.ppo_epochs=2",
    "es_manager.train.env_groups=8", "es_manager.train.group_size=2",
    # validation: 64 fixed held-out maps, SAMPLED at the training temperature (round 3).  Greedy decoding of
    # this tiny policy flickered between 0 and ~0.6 from one evaluation to the next (rounds 1-2, runs_r3check/)
    "es_manager.val.env_groups=64", "es_manager.val.group_size=1",
    "actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    "es_manager.format_penalty=-0.1",
    "agent_proxy.max_actions_per_turn=1", "agent_proxy.prefill_answer=true", "agent_proxy.enable_think=false",
    "agent_proxy.use_turn_scores=true",
    "actor_rollout_ref.rollout.response_length=4", "actor_rollout_ref.rollout.temperature=1.0",
    "actor_rollout_ref.model.enable_gradient_checkpointing=false",
    "actor_rollout_ref.actor.optim.lr=5e-4",
    "critic.optim.lr=1e-3",
    "algorithm.gamma=1.0", "algorithm.lam=1.0", "algorithm.high_level_gamma=0.95",
    "archer.alpha=0.1", "archer.warmup_iters=3",
    "archer.utterance_critic.backbone=hashing", "archer.utterance_critic.hidden_size=64",
    "archer.utterance_critic.lr=1e-3",
    "archer.utterance_critic.updates=50", "archer.utterance_critic.batch_size=64", "archer.replay.capacity=10000",
    "trainer.device=cpu", "trainer.precision=fp32", "trainer.logger=[console]", "trainer.save_freq=0",
    "trainer.test_freq=5", "trainer.val_before_train=true", "trainer.resume_mode=disable",
    "seed.val=123",
]
# --policy other than "small" (a real LLM: model alias, HF dir or .gguf): each run is the main job,
# config/archer.yaml (multi-turn FrozenLake, its format warm-up, batch, learning rate and validation), with only
# the estimator and the seed changed; SHARED and the per-task settings above are the small policy's
REAL_POLICY_CONFIG = "archer"
REAL_POLICY_SET = ["trainer.logger=[console]", "trainer.save_freq=0", "trainer.resume_mode=disable"]
QUICK = ["es_manager.train.env_groups=2", "es_manager.train.group_size=2", "es_manager.val.env_groups=4",
         "micro_batch_size_per_gpu=4", "ppo_mini_batch_size=4", "trainer.test_freq=1",
         "archer.utterance_critic.updates=2", "archer.utterance_critic.batch_size=8"]


# --------------------------------------------------------------------------------------------- config
def _follow_env_groups(overrides: list[str]) -> list[str]:
    """One env tag per task, so its ``n_groups`` must equal ``env_groups``: append ``n_groups=[N]`` for each
    mode whose last ``env_groups=N`` is not followed by an explicit ``n_groups`` override."""
    out = list(overrides)
    for mode in ("train", "val"):
        env_key, n_key = f"es_manager.{mode}.env_groups=", f"es_manager.{mode}.env_configs.n_groups="
        env_at = [i for i, o in enumerate(out) if o.startswith(env_key)]
        n_at = [i for i, o in enumerate(out) if o.startswith(n_key)]
        if env_at and (not n_at or n_at[-1] < env_at[-1]):
            out.append(f"{n_key}[{out[env_at[-1]][len(env_key):]}]")
    return out


def task_overrides(task: str, quick: bool = False) -> list[str]:
    spec = TASKS[task]
    tag = spec["tag"]
    # later overrides win: the quick settings come last so they also beat the per-task ones
    return _follow_env_groups(SHARED + [
        f"es_manager.train.env_configs.tags=[{tag}]", f"es_manager.val.env_configs.tags=[{tag}]",
    ] + spec["overrides"] + (QUICK if quick else []))


def compose(overrides: list[str], config_name: str = "base"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def run_overrides(task: str, estimator: str, seed: int, policy_dir: str, out_dir: str, steps: int,
                  quick: bool = False, extra: list[str] = (), real: bool = False) -> list[str]:
    """Overrides of one run: on ``config/base.yaml`` for the small policy, on ``config/archer.yaml`` (the main
    job) for a real LLM (``real``)."""
    run = [f"model_path={policy_dir}", f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={out_dir}",
           f"trainer.experiment_name={task}-{estimator}-seed{seed}", f"seed.train={10000 + 100000 * seed}"]
    if real:
        tag = TASKS[task]["tag"]
        own = [] if task == "frozenlake" else TASKS[task]["overrides"]  # archer.yaml is FrozenLake already
        return _follow_env_groups([f"es_manager.train.env_configs.tags=[{tag}]",
                                   f"es_manager.val.env_configs.tags=[{tag}]"] + own + ESTIMATORS[estimator]
                                  + run + REAL_POLICY_SET + list(extra))
    return _follow_env_groups(task_overrides(task, quick) + ESTIMATORS[estimator] + run + list(extra))


def ensure_policy(task: str, runs: str, quick: bool, warmup_steps: int, log=print) -> str:
    """The format-warmed-up policy of ``task`` (built once under ``runs``; later calls reuse it)."""
    from bench.small_policy import build_policy_dir, format_warmup

    directory = os.path.join(runs, "policies", task)
    if os.path.isfile(os.path.join(directory, "format_warmup.json")):
        return directory
    cfg = compose(task_overrides(task, quick) + ["model_path=tiny-random"])
    tmp = directory + ".tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    build_policy_dir(tmp, cfg, seed=0)
    log(f"[{task}] format warm-up ({warmup_steps} steps, random valid actions) -> {directory}")
    report = format_warmup(tmp, cfg, TASKS[task]["env_type"], steps=warmup_steps,
                           n_rollouts=2 if quick else 12, log=log)
    log(f"[{task}] warm-up done: reply CE {report['final_loss']:.3f}, {report['wall_s']:.0f} s")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


# --------------------------------------------------------------------------------------------- one run
def train_one(task: str, estimator: str, seed: int, policy_dir: str, out_json: str, steps: int, quick: bool,
              extra: list[str], real: bool = False) -> dict[str, Any]:
    """Train one (task, estimator, seed) in this process and write its points to ``out_json``."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    import ragen  # noqa: F401  (registers the estimators with veRL)
    from ragen.trainer.agent_trainer import AgentTrainer

    out_dir = os.path.join(os.path.dirname(out_json), f"seed{seed}_trainer")
    overrides = run_overrides(task, estimator, seed, policy_dir, out_dir, steps, quick, extra, real)
    cfg = compose(overrides, REAL_POLICY_CONFIG if real else "base")
    start = time.perf_counter()
    trainer = AgentTrainer(cfg)
    setup_s = time.perf_counter() - start
    inner = trainer.train_step

    def timed_step(step: int) -> dict[str, float]:
        metrics = inner(step)
        metrics["bench/elapsed_s"] = time.perf_counter() - start
        return metrics

    trainer.train_step = timed_step
    history = trainer.fit()
    total_s = time.perf_counter() - start
    points, cum_env, cum_train = [], 0.0, 0.0
    for h in history:
        cum_env += float(h.get("perf/env_steps", 0.0))
        cum_train += float(h.get("timing/step_s", 0.0))
        points.append({
            "step": int(h["step"]), "env_steps": cum_env, "train_wall_s": cum_train,
            "elapsed_s": float(h.get("bench/elapsed_s", setup_s)),
            "val_success": h.get("val/env/all/success_rate"), "train_success": h.get("train/env/all/success_rate"),
            "val_format_ok": h.get("val/env/all/format_ok_rate"), "train_reward": h.get("train/env/all/reward"),
        })
    result = {"task": task, "estimator": estimator, "seed": seed, "steps": steps, "setup_s": setup_s,
              "total_s": total_s, "overrides": overrides, "config": REAL_POLICY_CONFIG if real else "base",
              "points": points}
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    with open(out_json + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    os.replace(out_json + ".tmp", out_json)
    return result


def launch(job: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
    """Run one job in a subprocess (isolated RNG state, 1 thread); returns (job, return code, seconds)."""
    os.makedirs(os.path.dirname(job["out"]), exist_ok=True)
    log_path = job["out"][: -len(".json")] + ".log"
    from preload_tcmalloc import with_tcmalloc  # the allocator train.py runs under (RAGEN_ALLOCATOR)

    env = with_tcmalloc(dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    cmd = [sys.executable, "-m", "bench.sample_efficiency", "--_run", job["task"], job["estimator"], str(job["seed"]),
           job["policy"], job["out"], str(job["steps"])] + (["--quick"] if job["quick"] else []) \
        + (["--real-policy"] if job["real"] else [])
    for o in job["extra"]:
        cmd += ["--set", o]
    tick = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return job, rc, time.time() - tick


# --------------------------------------------------------------------------------------------- report
def load_results(runs_dir: str, tasks: list[str], estimators: list[str], seeds: int, tag: str = "") -> list[dict]:
    runs = []
    for task in tasks:
        for est in estimators:
            for seed in range(seeds):
                path = os.path.join(runs_dir, "runs" + tag, task, est, f"seed{seed}.json")
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as fh:
                        runs.append(json.load(fh))
    return runs


def first_reach(points: list[dict], threshold: float, key: str = "env_steps") -> float | None:
    """``key`` (env steps, or ``elapsed_s`` for wall seconds) at the first validation >= threshold."""
    for p in points:
        if p["val_success"] is not None and p["val_success"] >= threshold:
            return p[key]
    return None


def final_val(points: list[dict]) -> float:
    vals = [p["val_success"] for p in points if p["val_success"] is not None]
    return vals[-1] if vals else float("nan")


def write_points(runs: list[dict], results: str, stem: str) -> None:
    fields = ["task", "estimator", "seed", "step", "env_steps", "train_wall_s", "elapsed_s", "val_success",
              "train_success", "val_format_ok", "train_reward"]
    rows = [{"task": r["task"], "estimator": r["estimator"], "seed": r["seed"], **p} for r in runs for p in r["points"]]
    with open(os.path.join(results, stem + ".csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def plot_task(runs: list[dict], task: str, estimators: list[str], path: str, threshold: float) -> None:
    """Two panels: validation success vs cumulative env steps (left) and vs wall seconds into the run (right:
    model load, format warm-up, rollouts, updates and validation); mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for est in estimators:
        mine = [r for r in runs if r["task"] == task and r["estimator"] == est]
        if not mine:
            continue
        curves = [[p for p in r["points"] if p["val_success"] is not None] for r in mine]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        ys = np.array([[c[i]["val_success"] for i in range(n)] for c in curves])
        color = None
        for ax, key in zip(axes, ("env_steps", "elapsed_s")):
            xs = np.mean([[c[i][key] for i in range(n)] for c in curves], axis=0)
            line, = ax.plot(xs, ys.mean(0), marker="o", ms=3, color=color, label=f"{est} (n={len(mine)})")
            color = line.get_color()
            ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
    sampled = all("actor_rollout_ref.rollout.val_kwargs.do_sample=true" in r.get("overrides", [])
                  for r in runs if r["task"] == task)
    axes[0].set_ylabel("validation success rate (" + ("sampled, T=1" if sampled else "greedy") + ")")
    axes[0].set_xlabel("cumulative environment steps (training rollouts)")
    axes[1].set_xlabel("wall seconds into the run: rollouts, updates, validation (1 torch thread)")
    for ax in axes:
        ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{task}: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steps_to_threshold_bound(points: list[dict], threshold: float) -> tuple[float, bool]:
    """(env steps to the threshold, reached?); a run that never reaches it counts its whole budget, which
    makes the value a LOWER bound for that run (right-censored)."""
    hit = first_reach(points, threshold)
    if hit is not None:
        return hit, True
    return (points[-1]["env_steps"] if points else float("nan")), False


def late_train_success(points: list[dict], last: int = 10) -> float:
    """Mean sampled training success over the last ``last`` training steps."""
    vals = [p["train_success"] for p in points if p.get("train_success") is not None][-last:]
    return sum(vals) / len(vals) if vals else float("nan")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _seed_stats(mine: list[dict], thr: float) -> dict[str, str]:
    """Formatted cells shared by the summary and the side-by-side tables for the seeds ``mine`` of one
    (task, estimator): reached k/n, mean env steps to the threshold over reaching seeds, final and best
    validation success, env steps per run."""
    hit = [x for x in (first_reach(r["points"], thr) for r in mine) if x is not None]
    finals = [final_val(r["points"]) for r in mine]
    mean_f = _mean(finals)
    std_f = math.sqrt(_mean([(f - mean_f) ** 2 for f in finals]))
    bests = [max((p["val_success"] for p in r["points"] if p["val_success"] is not None), default=0.0)
             for r in mine]
    return {"reached": f"{len(hit)}/{len(mine)}",
            "steps": f"{_mean(hit):.0f}" if hit else "not reached",
            "final": f"{mean_f:.3f} +- {std_f:.3f}",
            "best": f"{_mean(bests):.3f}",
            "budget": f"{_mean([r['points'][-1]['env_steps'] if r['points'] else 0.0 for r in mine]):.0f}"}


def summary_table(runs: list[dict], tasks: list[str], estimators: list[str], thresholds: dict[str, float],
                  reference: str = "gae") -> str:
    """Markdown table per task.  ``x <reference>`` is the reference's mean censored env steps divided by this
    estimator's: > 1 means this estimator needed fewer env steps; ">=" / "<=" mark ratios where censoring
    (runs that never reached the threshold) makes the number a bound rather than a value."""
    lines = []
    for task in tasks:
        thr = thresholds[task]
        lines += [f"### {task} (threshold: validation success >= {thr})", "",
                  "| estimator | seeds | reached | env steps to threshold (mean over reaching seeds) | "
                  "env steps to threshold (unreached = budget, mean) | "
                  f"x fewer env steps than {reference} | wall s to threshold (mean over reaching seeds) | "
                  "initial val success | final val success (mean +- std) | "
                  "best val success | train success, last 10 steps | wall s / run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        per_est = {est: [r for r in runs if r["task"] == task and r["estimator"] == est] for est in estimators}
        bounds = {}  # estimator -> (mean censored env steps, every seed reached?)
        for est, mine in per_est.items():
            if mine:
                pairs = [steps_to_threshold_bound(r["points"], thr) for r in mine]
                bounds[est] = (_mean([x for x, _ in pairs]), all(ok for _, ok in pairs))
        for est, mine in per_est.items():
            if not mine:
                continue
            cells = _seed_stats(mine, thr)
            inits = [next((p["val_success"] for p in r["points"] if p["val_success"] is not None), float("nan"))
                     for r in mine]
            mine_b, mine_exact = bounds[est]
            ref = bounds.get(reference)
            if ref is None or not (mine_exact or ref[1]):
                ratio = "-"  # both sides censored: no ratio can be stated
            else:
                # mine exact & ref censored -> ref is a lower bound -> ratio >= value; the mirror case <=
                mark = "" if (mine_exact and ref[1]) else (">=" if mine_exact else "<=")
                ratio = f"{mark}{ref[0] / mine_b:.2f}"
            walls = [w for w in (first_reach(r["points"], thr, "elapsed_s") for r in mine) if w is not None]
            lines.append(f"| {est} | {len(mine)} | {cells['reached']} | {cells['steps']} | "
                         f"{mine_b:.0f}{'' if mine_exact else ' (lower bound)'} | {ratio} | "
                         f"{f'{_mean(walls):.0f}' if walls else '-'} | {_mean(inits):.3f} | {cells['final']} | "
                         f"{cells['best']} | {_mean([late_train_success(r['points']) for r in mine]):.3f} | "
                         f"{_mean([r['total_s'] for r in mine]):.0f} |")
        lines.append("")
    return "\n".join(lines)


COMPARE_COLUMNS = ("reached", "env steps to thr.", "final val success", "best val success", "env steps / run")


def compare_table(runs_dir: str, tasks: list[str], estimators: list[str], seeds: int,
                  variants: list[tuple[str, str]]) -> str:
    """Side-by-side table of several variants (``(label, tag)``; tag ``""`` = the default run)."""
    per = {label: load_results(runs_dir, tasks, estimators, seeds, tag) for label, tag in variants}
    lines = []
    for task in tasks:
        thr = TASKS[task]["threshold"]
        lines += [f"### {task}: side by side (threshold: validation success >= {thr})", "",
                  "| estimator | variant | " + " | ".join(COMPARE_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(COMPARE_COLUMNS)]
        for est in estimators:  # one row per (estimator, variant) that has runs
            for lab, _ in variants:
                mine = [r for r in per[lab] if r["task"] == task and r["estimator"] == est]
                if mine:
                    c = _seed_stats(mine, thr)
                    lines.append(f"| {est} | {lab} | {c['reached']} | {c['steps']} | {c['final']} | {c['best']} | "
                                 f"{c['budget']} |")
        lines.append("")
    return "\n".join(lines)


def report(runs_dir: str, results: str, tasks: list[str], estimators: list[str], seeds: int, tag: str = "",
           header: str = "", compare: list[tuple[str, str]] = ()) -> str:
    """Summary table, points CSV and plots in ``results`` from the raw runs in ``runs_dir``."""
    runs = load_results(runs_dir, tasks, estimators, seeds, tag)
    if not runs and not compare:
        return "no results yet"
    table = ""
    if runs:  # a --compare-only tag (no runs of its own) just writes the side-by-side table
        write_points(runs, results, "sample_efficiency" + tag)
        for task in tasks:
            if any(r["task"] == task for r in runs):
                plot_task(runs, task, estimators, os.path.join(results, f"{task}{tag}.png"),
                          TASKS[task]["threshold"])
        table = summary_table(runs, tasks, estimators, {t: TASKS[t]["threshold"] for t in tasks})
    text = (header + "\n\n" if header else "") + table
    if compare:
        text += "\n" + compare_table(runs_dir, tasks, estimators, seeds, list(compare))
    with open(os.path.join(results, f"summary{tag}.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return text


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sample_efficiency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["frozenlake", "sokoban"], choices=sorted(TASKS))
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="launch only these of the --seeds seeds now (a later run with the same --tag adds the rest)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: per task)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (1 torch thread each)")
    p.add_argument("--warmup-steps", type=int, default=150, help="format warm-up steps (once per task)")
    p.add_argument("--policy", default="small",
                   help="'small' (the from-scratch policy of bench/small_policy.py, built once per task) or a "
                        "real model: alias (smollm2-135m), HF directory or .gguf; each run of a real model is the "
                        "main job (config/archer.yaml) with the estimator and seed changed")
    p.add_argument("--results", default=RESULTS, help="summaries, points CSV and plots (default bench/results)")
    p.add_argument("--runs", default=RUNS, help="raw per-seed runs and the warmed-up policies (not in git)")
    p.add_argument("--tag", default="", help="suffix for a variant (runs<tag>/, summary<tag>.md, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every run (use with --tag)")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=TAG",
                   help="add a side-by-side table of these variants to the summary (TAG empty = default run), "
                        "e.g. --compare round1= --compare round2=_round2")
    p.add_argument("--notes", default="", help="free text appended to the summary header")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, 2 steps, tiny batches")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--_run", nargs=6, help=argparse.SUPPRESS)
    p.add_argument("--real-policy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._run:
        task, est, seed, policy, out, steps = args._run
        train_one(task, est, int(seed), policy, out, int(steps), args.quick, args.set, args.real_policy)
        return 0

    if args.only_seeds is not None and not all(0 <= s < args.seeds for s in args.only_seeds):
        raise SystemExit(f"--only-seeds {args.only_seeds}: each seed must be in 0..{args.seeds - 1} "
                         f"(--seeds {args.seeds})")
    results, runs_dir = os.path.abspath(args.results), os.path.abspath(args.runs)
    if args.quick:  # a smoke run never overwrites the real summaries
        results = os.path.join(runs_dir, "quick") if args.results == RESULTS else results
        runs_dir = os.path.join(runs_dir, "quick")
        args.seeds = 1
    os.makedirs(results, exist_ok=True)
    os.makedirs(runs_dir, exist_ok=True)
    from tqdm.auto import tqdm

    seeds = [s for s in range(args.seeds) if args.only_seeds is None or s in args.only_seeds]  # after --quick
    if not args.report_only:
        wall0 = time.time()
        jobs = []
        for task in args.tasks:
            if args.policy == "small":
                policy = ensure_policy(task, runs_dir, args.quick, 20 if args.quick else args.warmup_steps,
                                       log=tqdm.write)
            else:
                policy = args.policy
            if args.quick:
                steps = 2
            elif args.steps:
                steps = args.steps
            elif args.policy == "small":
                steps = TASKS[task]["steps"]
            else:
                steps = int(compose([], REAL_POLICY_CONFIG).trainer.total_training_steps)
            for seed in seeds:
                for est in args.estimators:
                    out = os.path.join(runs_dir, "runs" + args.tag, task, est, f"seed{seed}.json")
                    jobs.append({"task": task, "estimator": est, "seed": seed, "policy": policy, "out": out,
                                 "steps": steps, "quick": args.quick,
                                 "extra": args.set, "real": args.policy != "small"})
        todo = [j for j in jobs if not os.path.isfile(j["out"])]
        tqdm.write(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to go "
                   f"({args.workers} at a time)")
        failed = []
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="runs", dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            futures = [pool.submit(launch, j) for j in todo]
            for fut in as_completed(futures):
                job, rc, secs = fut.result()
                name = f"{job['task']}/{job['estimator']}/seed{job['seed']}"
                if rc != 0:
                    failed.append(name)
                    tqdm.write(f"FAILED {name} (rc={rc}); log: {job['out'][:-5]}.log")
                else:
                    with open(job["out"], encoding="utf-8") as fh:
                        res = json.load(fh)
                    tqdm.write(f"done {name}: {secs:.0f} s, final val success {final_val(res['points']):.3f}")
                bar.update(1)
        tqdm.write(f"benchmark wall time {time.time() - wall0:.0f} s")
        if failed:
            tqdm.write("failed runs: " + ", ".join(failed))
    header = ("Sample efficiency (validation success vs env steps); settings: see bench/sample_efficiency.py"
              + (f"; variant {args.tag}: {' '.join(args.set)}" if args.tag else ""))
    if args.notes:
        header += "\n\n" + args.notes
    compare = [tuple(c.split("=", 1)) if "=" in c else (c, "") for c in args.compare]
    print(report(runs_dir, results, args.tasks, args.estimators, args.seeds, args.tag, header, compare))
    return 0


if __name__ == "__main__":
    sys.exit(main())
