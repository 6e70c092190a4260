"""Summary of an offline shake-down run (``run_offline.sh``): prints it and writes ``results/summary.md`` and
``results/summary.json``.

    python summary.py OUT_DIR [--check]

Reads ``OUT_DIR/results``: ``env.json`` (GPU, versions), ``overrides.txt`` (the main_ppo overrides, composed
again here to name the engines), ``metrics_first.jsonl`` / ``metrics_resumed.jsonl`` (veRL's file logger),
``runs.jsonl`` (exit status and wall time of each run), ``gpu_mem.csv`` (nvidia-smi's memory.used of the GPU, MiB,
every second) and ``gpu_mem_baseline.csv``.  ``--check`` exits 1 unless the first run logged steps 1 and 2 and the
resumed run step 2.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PHASES = ["gen", "update_weights", "old_log_prob", "archer_critic", "update_actor", "testing", "save_checkpoint",
          "step"]
ENGINE_KEYS = [
    ("device", "trainer.device"),
    ("actor strategy", "actor_rollout_ref.actor.strategy"),
    ("actor FSDP", "actor_rollout_ref.actor.fsdp_config.strategy"),
    ("actor weights dtype", "actor_rollout_ref.actor.fsdp_config.model_dtype"),
    ("actor FSDP mixed precision (param dtype)", "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype"),
    ("ref strategy", "actor_rollout_ref.ref.strategy"),
    ("rollout", "actor_rollout_ref.rollout.name"),
    ("rollout dtype", "actor_rollout_ref.rollout.dtype"),
    ("attention", "actor_rollout_ref.model.override_config.attn_implementation"),
    ("trainer", "trainer.v1.trainer_mode"),
    ("estimator", "algorithm.adv_estimator"),
    ("ArCHer critic", "algorithm.archer.value_model"),
    ("token critic (critic.enable)", "critic.enable"),
    ("env groups x episodes", None),
]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_of(path: Path) -> dict[int, dict]:
    return {int(rec["step"]): rec["data"] for rec in read_jsonl(path)}


def engines(results: Path, config_dir: Path) -> dict[str, str]:
    """The engine settings main_ppo ran with: archer_cpu.yaml plus the overrides, composed by Hydra again."""
    import warnings

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [line for line in (results / "overrides.txt").read_text().splitlines() if line]
    with warnings.catch_warnings(), initialize_config_dir(config_dir=str(config_dir / "verl"), version_base=None):
        warnings.simplefilter("ignore")  # veRL's import warns of every engine it lacks
        cfg = compose(config_name="archer_cpu", overrides=overrides)
    out = {}
    for label, key in ENGINE_KEYS:
        if key is None:
            groups, episodes = (OmegaConf.select(cfg, k) for k in ("data.train_batch_size",
                                                                    "actor_rollout_ref.rollout.n"))
            value = f"{groups} x {episodes}"
        else:
            value = OmegaConf.select(cfg, key, default="(unset)")
        out[label] = str(value)
    if out["actor FSDP mixed precision (param dtype)"] == "(unset)":
        # verl/workers/engine/fsdp/transformer_impl.py:391-397: no mixed_precision section means bf16 params,
        # fp32 reduce and buffers over the model_dtype master weights
        out["actor FSDP mixed precision (param dtype)"] = "bf16 (veRL's default)"
    if out["rollout"] == "hf":
        # ragen/workers/verl_backend/hf_rollout.py: the HFServer actor asks Ray for no GPU and loads the model with
        # from_pretrained's default device
        out["rollout"] += " (the plugin's transformers replica: a Ray actor holding no GPU, so it decodes on the CPU)"
    return out


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def config_dir_of(out: Path) -> Path:
    repo = Path(__file__).resolve().parents[2] if len(Path(__file__).resolve().parents) > 2 else out
    for candidate in (out / "config", repo / "config"):  # carried by pack.sh, or the repo's
        if (candidate / "verl" / "archer_cpu.yaml").is_file():
            return candidate
    raise SystemExit("no config/verl/archer_cpu.yaml found")


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve()
    check = "--check" in argv[1:]
    results = out / "results"
    env = json.loads((results / "env.json").read_text()) if (results / "env.json").is_file() else {}
    runs = {r["run"]: r for r in read_jsonl(results / "runs.jsonl")}
    first, resumed = steps_of(results / "metrics_first.jsonl"), steps_of(results / "metrics_resumed.jsonl")
    try:
        engine = engines(results, config_dir_of(out))
    except Exception as exc:  # the summary still comes out
        engine = {"(could not compose the config)": repr(exc)}

    lines = [f"# Offline shake-down (tier a): {env.get('mode', '?')}", ""]
    lines += [f"- GPU: {env.get('gpu', '?')}" + (f" ({env['gpu_memory_gib']} GiB, driver {env.get('driver', '?')}, "
                                                 f"bf16 {env.get('bf16')})" if "gpu_memory_gib" in env else "")]
    lines += ["- versions: " + ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "cuda", "verl", "ray",
                                                                      "transformers", "ragen-archer", "tensordict",
                                                                      "transferqueue"))]
    lines += ["- engines: " + "; ".join(f"{k}: {v}" for k, v in engine.items())]
    lines += ["- runs: " + ", ".join(f"{name} exit {r['rc']} in {r['wall_s']} s (Ray, model load and validation "
                                     "included)" for name, r in runs.items())]
    lines += ["", "Per-phase times (s) from veRL's file logger (timing_s/*), tokens/s = perf/throughput (all tokens "
              "of the batch / step time / GPUs):", ""]
    lines += ["| run | step | " + " | ".join(PHASES) + " | tokens | tokens/s |",
              "|---|---:|" + "---:|" * (len(PHASES) + 2)]
    rows = []
    for name, steps in (("first", first), ("resumed", resumed)):
        for step, data in sorted(steps.items()):
            timings = {p: data.get(f"timing_s/{p}") for p in PHASES}
            row = {"run": name, "step": step, **{f"timing_s/{p}": v for p, v in timings.items()},
                   "perf/total_num_tokens": data.get("perf/total_num_tokens"),
                   "perf/throughput": data.get("perf/throughput")}
            rows.append(row)
            lines.append(f"| {name} | {step} | " + " | ".join(fmt(timings[p]) for p in PHASES)
                         + f" | {fmt(row['perf/total_num_tokens'], 0)} | {fmt(row['perf/throughput'], 1)} |")

    memory = {}
    mem_file = results / "gpu_mem.csv"
    if mem_file.is_file():
        samples = [int(x) for x in mem_file.read_text().split() if x.strip().isdigit()]
        base_file = results / "gpu_mem_baseline.csv"
        baseline = [int(x) for x in base_file.read_text().split() if x.strip().isdigit()] if base_file.is_file() else []
        if samples:
            memory = {"peak_mib": max(samples), "baseline_mib": baseline[0] if baseline else None,
                      "samples": len(samples)}
    torch_peak = max([d[k] for d in [*first.values(), *resumed.values()]
                      for k in ("actor/perf/max_memory_allocated_gb", "perf/max_memory_allocated_gb") if k in d],
                     default=None)
    lines.append("")
    if memory:
        lines.append(f"- peak GPU memory (nvidia-smi memory.used, whole device, every 1 s, {memory['samples']} "
                     f"samples): {memory['peak_mib']} MiB (before the runs: {memory['baseline_mib']} MiB)")
    else:
        lines.append("- peak GPU memory: n/a (no nvidia-smi samples: --cpu or no GPU)")
    if torch_peak is not None and env.get("mode") == "gpu":
        lines.append(f"- peak memory allocated by torch in the actor worker (its own process only): "
                     f"{torch_peak:.2f} GB")

    # the resumed step 2 against the first run's step 2 (timings aside)
    compared, differ = [], {}
    if 2 in first and 2 in resumed:
        compared = [k for k, v in first[2].items() if isinstance(v, (int, float))
                    and not k.startswith(("timing", "perf", "actor/perf"))]
        for k in compared:
            a, b = first[2][k], resumed[2].get(k)
            if not isinstance(b, (int, float)) or not math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8):
                differ[k] = (a, b)
        note = ("identical" if not differ else f"{len(differ)} differ, e.g. "
                + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in list(differ.items())[:4]))
        lines.append(f"- resume: step 2 after resuming from global_step_1 against the first run's step 2, "
                     f"{len(compared)} metrics: {note}")
    ok = sorted(first) == [1, 2] and sorted(resumed) == [2]
    lines.append(f"- verdict: {'PASS' if ok else 'FAIL'} (first run steps {sorted(first)}, resumed run steps "
                 f"{sorted(resumed)})")

    text = "\n".join(lines) + "\n"
    (results / "summary.md").write_text(text)
    (results / "summary.json").write_text(json.dumps(
        {"env": env, "engines": engine, "runs": runs, "phases": rows, "gpu_memory": memory,
         "torch_peak_allocated_gb": torch_peak, "resume_metrics_compared": len(compared),
         "resume_metrics_differ": differ, "pass": ok}, indent=1, default=str))
    print(text, end="")
    return 0 if ok or not check else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
