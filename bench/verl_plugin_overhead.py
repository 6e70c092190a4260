"""What the ArCHer plugin adds to a step of veRL's own trainer, measured in one run on this machine.

    python -m bench.verl_plugin_overhead [--steps 4] [--model tiny-random] [--out bench/results/verl_plugin_overhead.md]

Two ``python -m verl.trainer.main_ppo`` runs on one FrozenLake dataset (``python -m ragen.verl_plugin.dataset``)
and one config (``config/verl/archer_cpu.yaml`` with the token critic on, alpha 0.1), one after the other:

* ``gae``: veRL's sync trainer and its own GAE (token critic);
* ``archer``: the plugin's trainer: the same token critic plus the utterance critic (turn reconstruction, replay
  buffer, TD updates, V-target replies from veRL's rollout server) and the archer estimator.

It prints the mean step time over the steps after the first (the first starts the agent-loop worker), the
plugin's own phase (``timing_s/archer_critic``), the ratio of the two runs, the size of the critic's checkpoint
file next to the actor's, and the processes and peak memory (RSS summed over the process tree) of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def watch(proc: subprocess.Popen, samples: list[tuple[int, int]], stop: threading.Event) -> None:
    """Sample (processes, summed RSS) of ``proc``'s tree every 0.5 s (Ray's workers are its descendants)."""
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            tree = [root, *root.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
            samples.append((len(tree), rss))
        except psutil.Error:
            pass
        stop.wait(0.5)


def run(name: str, data: Path, model: str, ckpt: Path, steps: int, overrides: list[str]) -> dict:
    log = ckpt.parent / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", f"--config-path={ROOT / 'config' / 'verl'}",
           "--config-name=archer_cpu", f"data.train_files={data / 'train.parquet'}",
           f"data.val_files={data / 'val.parquet'}", f"actor_rollout_ref.model.path={model}",
           f"trainer.default_local_dir={ckpt}", f"trainer.total_training_steps={steps}", "trainer.save_freq=-1",
           "trainer.test_freq=-1", "trainer.logger=[file]", "critic.enable=true",
           f"critic.model.path={model}", *overrides]
    env = {**os.environ, "VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "2", "VERL_FILE_LOGGER_PATH": str(log)}
    samples: list[tuple[int, int]] = []
    stop = threading.Event()
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        watcher = threading.Thread(target=watch, args=(proc, samples, stop), daemon=True)
        watcher.start()
        _, err = proc.communicate(timeout=1200)
        stop.set()
    if proc.returncode:
        raise SystemExit(f"{name}: main_ppo failed\n{err[-4000:]}")
    wall = time.perf_counter() - start
    steps_logged = [json.loads(line)["data"] for line in log.read_text().splitlines()]
    later = steps_logged[1:] or steps_logged
    mean = lambda key: sum(s.get(key, 0.0) for s in later) / len(later)
    return {"wall_s": wall, "step_s": mean("timing_s/step"), "archer_s": mean("timing_s/archer_critic"),
            "adv_s": mean("timing_s/adv"), "processes": max(n for n, _ in samples),
            "peak_gib": max(r for _, r in samples) / 2**30}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verl_plugin_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "verl_plugin_overhead.md"))
    args = parser.parse_args(argv)

    from ragen.models import resolve_model_path
    from ragen.verl_plugin.dataset import main as write_dataset

    model = str(resolve_model_path(args.model))
    with tempfile.TemporaryDirectory(prefix="verl_plugin_bench_") as tmp:
        tmp = Path(tmp)
        write_dataset(["--config-name", "archer", "--out", str(tmp / "data"), f"model_path={args.model}",
                       f"trainer.total_training_steps={args.steps}"])
        archer_keys = ["algorithm.archer.alpha=0.1", "+algorithm.archer.utterance_critic.updates=20"]
        results = {
            "gae": run("gae", tmp / "data", model, tmp / "gae", args.steps,
                       ["trainer.v1.trainer_mode=sync", "algorithm.adv_estimator=gae", "~algorithm.archer"]),
            "archer": run("archer", tmp / "data", model, tmp / "archer", args.steps, archer_keys + [
                "trainer.save_freq=" + str(args.steps)]),
        }
        step_dir = tmp / "archer" / f"global_step_{args.steps}"
        critic_mib = (step_dir / "archer_critic.pt").stat().st_size / 2**20
        actor_mib = sum(p.stat().st_size for p in (step_dir / "actor").rglob("*") if p.is_file()) / 2**20

    gae, archer = results["gae"], results["archer"]
    lines = [f"`python -m bench.verl_plugin_overhead {' '.join(argv or sys.argv[1:])}` (model {args.model}, "
             f"{args.steps} steps, FrozenLake, 4 groups x 4 episodes, one run after the other on this machine)", "",
             "| run | step s (mean after step 1) | plugin critic phase s | adv s | processes | peak RSS GiB | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_s']:.2f} | {r['archer_s']:.2f} | {r['adv_s']:.3f} | {r['processes']} | "
                     f"{r['peak_gib']:.1f} | {r['wall_s']:.0f} |")
    lines += ["", f"archer / gae step time: {archer['step_s'] / gae['step_s']:.2f}x; the plugin's critic phase is "
                  f"{archer['archer_s'] / archer['step_s']:.0%} of archer's step (goal: <= 25 %); "
                  f"archer_critic.pt {critic_mib:.2f} MiB next to the actor's checkpoint {actor_mib:.1f} MiB"]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
