"""Rollout engines on the embedded SmolLM2-135M: today's HF ``generate`` path against PrefixCachingEngine.

    python -m bench.rollout_engines                                  # everything, ~40 min on 2 cores
    python -m bench.rollout_engines --sections call --reps 3 --malloc off
    python -m bench.rollout_engines --model tiny-random --call-reps 1     # smoke run of the code path

Each (section, allocator) pair runs in a child process of its own, the allocators alternating: glibc
malloc ("off") and tcmalloc ("on": ``LD_PRELOAD`` of Debian's ``libtcmalloc-minimal4``).  Variants:
``hf fp32`` is ``LocalWorkers.generate`` itself (fp32 weights, no autocast; the whole dialogue re-prefilled
every call), ``hf bf16`` the same on weights cast to bf16, ``engine fp32`` the PrefixCachingEngine on the
fp32 weights, ``engine bf16`` the engine with ``dtype=bfloat16`` (its bf16 copy of the weights refreshed
after each clear); the cache is cleared before each call or rollout (as after a weight update).  Sections:

* ``call``: one generate call on real FrozenLake dialogues (the turn-4 prompts of 32 validation episodes
  whose answers were unparseable, so all stay alive), 48 new tokens forced (eos ignored), sampled at T = 1,
  batch 16 and 32.  Prefill = a 1-token call, decode = the rest of a 48-token call.  The engine's prefill
  also gains from the prompts of the call sharing their first ~150 tokens (system prompt, instruction).
* ``rollout``: 32 FrozenLake episodes x up to 5 turns through the real AgentProxy: ``forced`` = a train
  rollout (8 groups x 4 episodes) of 40 tokens a turn (eos ignored) sampled at T = 1; ``natural`` = the
  same until ``<|im_end|>`` or 64 tokens (the training setting); the paths sample differently, so their
  dialogues differ (compare the token counts); ``greedy`` = the validation rollout (32 distinct episodes,
  greedy, natural lengths), where every path should write the same dialogues up to float rounding.

Prints markdown tables: the fastest of the repetitions (other jobs on a shared machine only ever slow a
run down; compare ratios within one table), ratios against hf fp32 under the same allocator.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
CALL_NEW_TOKENS = 48
FORCED_TOKENS = 40
NATURAL_TOKENS = 64
ROLLOUT_VARIANTS = ("hf fp32", "engine fp32", "engine bf16")
CALL_VARIANTS = ("hf fp32", "hf bf16", "engine fp32", "engine bf16")


# --------------------------------------------------------------------------------------------- child side
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(HERE, "config"), version_base=None):
        return hydra_compose("base", overrides=overrides)


MODEL = "smollm2-135m"


def frozenlake_config(extra: list[str]):
    return compose([f"model_path={MODEL}", "trainer.device=cpu", "trainer.precision=fp32",
                    "algorithm.adv_estimator=grpo", "critic.enable=false",
                    "es_manager.train.env_groups=8", "es_manager.train.group_size=4",
                    "es_manager.train.env_configs.tags=[FrozenLake]", "es_manager.train.env_configs.n_groups=[8]",
                    "es_manager.val.env_groups=32", "es_manager.val.group_size=1",
                    "es_manager.val.env_configs.tags=[FrozenLake]", "es_manager.val.env_configs.n_groups=[32]",
                    "agent_proxy.max_turn=5"] + extra)


class Backend:
    """``generate(DataProto)`` for the AgentProxy through one variant; ``forced`` ignores the eos."""

    def __init__(self, workers, model, engine, forced: bool):
        self.workers, self.model, self.engine, self.forced = workers, model, engine, forced
        self.tokenizer = workers.tokenizer

    def reset(self) -> None:
        """Forget cached KV and counters (as after a weight update)."""
        if self.engine is not None:
            self.engine.clear()
            self.engine.stats.update(prompt_tokens=0, prefilled_tokens=0, generated_tokens=0)

    def stats(self) -> dict:
        return dict(self.engine.stats) if self.engine is not None else {}

    def sampling(self, meta: dict):
        from ragen.workers.protocol import Sampling

        w = self.workers
        return Sampling.from_meta(meta, w.config.actor_rollout_ref.rollout, w.eos_token_id)

    def generate(self, prompts):
        from verl import DataProto

        from ragen.workers.hf_engine import generate_padded

        meta = dict(prompts.meta_info or {})
        if self.forced:
            meta["eos_token_id"] = []
        if self.engine is None:  # today's path, on this variant's weights
            saved, self.workers.actor = self.workers.actor, self.model
            try:
                return self.workers.generate(DataProto.from_dict(tensors=dict(prompts.batch.items()), meta_info=meta))
            finally:
                self.workers.actor = saved
        responses, mask = generate_padded(self.engine, prompts.batch["input_ids"], prompts.batch["attention_mask"],
                                          self.sampling(meta), self.workers.pad_token_id)
        return DataProto.from_dict(tensors={"responses": responses, "response_mask": mask})


def variants(workers) -> dict[str, Backend]:
    from ragen.workers.hf_engine import PrefixCachingEngine

    fp32 = workers.actor
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16).eval()
    pad = workers.pad_token_id
    return {"hf fp32": Backend(workers, fp32, None, False), "hf bf16": Backend(workers, bf16, None, False),
            "engine fp32": Backend(workers, fp32, PrefixCachingEngine(fp32, pad), False),
            "engine bf16": Backend(workers, fp32, PrefixCachingEngine(fp32, pad, dtype=torch.bfloat16), False)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def call_prompts(workers) -> list[list[int]]:
    """Turn-4 prompts of 32 FrozenLake validation episodes answered with unparseable replies."""
    from verl import DataProto

    from ragen.llm_agent import AgentProxy

    class Unparseable:
        tokenizer = workers.tokenizer
        prompts: list[list[int]] = []

        def generate(self, batch):
            ids, mask = batch.batch["input_ids"], batch.batch["attention_mask"].bool()
            self.prompts.append([ids[i][mask[i]].tolist() for i in range(ids.shape[0])])
            reply = torch.tensor(workers.tokenizer("I am not sure.", add_special_tokens=False)["input_ids"] + [2])
            return DataProto.from_dict(tensors={"responses": reply.repeat(ids.shape[0], 1),
                                                "response_mask": torch.ones(ids.shape[0], len(reply),
                                                                            dtype=torch.long)})

    fake = Unparseable()
    AgentProxy(frozenlake_config([]), fake, workers.tokenizer).rollout("val", 0)
    return fake.prompts[3]


def run_call(workers, reps: int) -> list[dict]:
    from verl import DataProto

    from ragen.llm_agent.agent_proxy import left_pad

    prompts = call_prompts(workers)
    backends = variants(workers)
    records = []
    for batch in (16, 32):
        ids, mask = left_pad(prompts[:batch], workers.pad_token_id)
        tokens = int(mask.sum())
        for rep in range(reps):
            names = CALL_VARIANTS if rep % 2 == 0 else CALL_VARIANTS[::-1]
            for name in names:
                backend = backends[name]
                times = {}
                for new in (1, CALL_NEW_TOKENS):
                    backend.reset()
                    request = DataProto.from_dict(
                        tensors={"input_ids": ids, "attention_mask": mask},
                        meta_info={"max_new_tokens": new, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                                   "seed": rep, "eos_token_id": []})
                    times[new], out = timed(lambda b=backend, r=request: b.generate(r))
                    assert int(out.batch["response_mask"].sum()) == batch * new
                prefilled = backend.stats().get("prefilled_tokens", tokens)
                records.append({"section": "call", "variant": name, "batch": batch, "rep": rep,
                                "prompt_tokens": tokens, "prefilled_tokens": prefilled,
                                "prefill_s": times[1], "decode_s": times[CALL_NEW_TOKENS] - times[1]})
                print(json.dumps(records[-1]), flush=True)
    return records


def run_rollout(workers, reps: int, backends: dict[str, Backend] | None = None,
                names: tuple[str, ...] = ROLLOUT_VARIANTS) -> list[dict]:
    """Both rollout settings through ``backends[name]`` for each name (the first is the reference of
    ``same_rows_as_ref``), interleaved over ``reps``."""
    from ragen.llm_agent import AgentProxy

    backends = backends or variants(workers)
    records = []
    settings = {"forced": ("train", [f"actor_rollout_ref.rollout.response_length={FORCED_TOKENS}"]),
                "natural": ("train", [f"actor_rollout_ref.rollout.response_length={NATURAL_TOKENS}"]),
                "greedy": ("val", [f"actor_rollout_ref.rollout.response_length={NATURAL_TOKENS}"])}
    for setting, (mode, extra) in settings.items():
        config = frozenlake_config(extra)
        for rep in range(reps):
            rows: dict[str, list[list[int]]] = {}
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                backend = backends[name]
                backend.forced = setting == "forced"
                backend.reset()
                proxy = AgentProxy(config, backend, workers.tokenizer)
                seconds, batch = timed(lambda p=proxy, m=mode, r=rep: p.rollout(m, r))
                m = batch.meta_info["metrics"]
                mask = batch.batch["attention_mask"].bool()
                rows[name] = [batch.batch["input_ids"][i][mask[i]].tolist() for i in range(mask.shape[0])]
                stats = backend.stats()
                records.append({"section": "rollout", "setting": setting, "variant": name, "rep": rep,
                                "seconds": seconds, "gen_s": m["rollout/gen_time_s"],
                                "gen_tokens": m["rollout/gen_tokens"], "gen_calls": m["rollout/gen_calls"],
                                "row_len_mean": m["rollout/row_len_mean"],
                                "prefilled_tokens": stats.get("prefilled_tokens"),
                                "prompt_tokens": stats.get("prompt_tokens")})
                print(json.dumps(records[-1]), flush=True)
            for k, name in enumerate(order):
                records[-len(order) + k]["same_rows_as_ref"] = sum(
                    a == b for a, b in zip(rows[name], rows[names[0]])) / len(rows[names[0]])
    return records


def child(section: str, reps: int, out: str) -> None:
    from ragen.workers import LocalWorkers

    workers = LocalWorkers(frozenlake_config([]))
    records = (run_call if section == "call" else run_rollout)(workers, reps)
    malloc = "on" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "off"
    for r in records:
        r["malloc"] = malloc
    with open(out, "w") as f:
        json.dump(records, f)


# --------------------------------------------------------------------------------------------- parent side
def best(values: list[float]) -> float:
    """The fastest repetition: contention from other jobs only adds time."""
    return min(values)


def call_table(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["section"] == "call":
            groups[(r["malloc"], r["variant"], r["batch"])].append(r)
    lines = ["| malloc | variant | B | prompt tok (prefilled) | prefill s | decode s | prefill tok/s | decode tok/s "
             "| total s | total vs hf fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (malloc, variant, batch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2],
                                                                              CALL_VARIANTS.index(kv[0][1]))):
        pre, dec = best([r["prefill_s"] for r in rs]), best([r["decode_s"] for r in rs])
        base = groups[(malloc, "hf fp32", batch)]
        base_total = best([r["prefill_s"] + r["decode_s"] for r in base])
        total = best([r["prefill_s"] + r["decode_s"] for r in rs])
        lines.append(f"| {malloc} | {variant} | {batch} | {rs[0]['prompt_tokens']} ({rs[0]['prefilled_tokens']}) "
                     f"| {pre:.2f} | {dec:.2f} | {rs[0]['prompt_tokens'] / pre:.0f} "
                     f"| {batch * (CALL_NEW_TOKENS - 1) / dec:.1f} | {total:.2f} | {total / base_total:.2f} |")
    return "\n".join(lines)


def rollout_table(records: list[dict], names: tuple[str, ...] = ROLLOUT_VARIANTS) -> str:
    """Per setting, allocator and variant; ratios and identical rows against ``names[0]``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["section"] == "rollout":
            groups[(r["setting"], r["malloc"], r["variant"])].append(r)
    lines = [f"| setting | malloc | variant | rollout s | generate s | vs {names[0]} | generated tok | calls "
             f"| mean row len | prefilled / prompt tok | rows = {names[0]} |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (setting, malloc, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                names.index(kv[0][2]))):
        sec = best([r["seconds"] for r in rs])
        base = best([r["seconds"] for r in groups[(setting, malloc, names[0])]])
        pre = "" if rs[0]["prefilled_tokens"] is None else f"{rs[0]['prefilled_tokens']} / {rs[0]['prompt_tokens']}"
        same = f"{best([r['same_rows_as_ref'] for r in rs]):.2f}" if setting == "greedy" else "-"
        lines.append(f"| {setting} | {malloc} | {variant} | {sec:.1f} | {best([r['gen_s'] for r in rs]):.1f} "
                     f"| {sec / base:.2f} | {best([r['gen_tokens'] for r in rs]):.0f} "
                     f"| {best([r['gen_calls'] for r in rs]):.0f} | {best([r['row_len_mean'] for r in rs]):.0f} "
                     f"| {pre} | {same} |")
    return "\n".join(lines)


def malloc_ratio_table(records: list[dict]) -> str:
    """tcmalloc / glibc time per (section, variant)."""
    sums: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        key = (r["section"], r.get("setting") or f"B={r['batch']}", r["variant"])
        sums[key][r["malloc"]].append(r["seconds"] if r["section"] == "rollout" else r["prefill_s"] + r["decode_s"])
    lines = ["| section | case | variant | glibc s | tcmalloc s | tcmalloc / glibc |", "|---|---|---|---:|---:|---:|"]
    for key, by in sorted(sums.items()):
        if "on" in by and "off" in by:
            off, on = best(by["off"]), best(by["on"])
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {off:.1f} | {on:.1f} | {on / off:.2f} |")
    return "\n".join(lines)


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["call", "rollout"], choices=["call", "rollout"])
    parser.add_argument("--reps", type=int, default=1, help="repetitions of the whole bench (the fastest is reported)")
    parser.add_argument("--call-reps", type=int, default=3, help="repetitions inside a call section")
    parser.add_argument("--malloc", default="both", choices=["both", "off", "on"], help="glibc, tcmalloc or both")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--model", default=MODEL, help="model_path (tiny-random: a quick check of the code path)")
    parser.add_argument("--child", choices=["call", "rollout"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    MODEL = args.model
    if args.child:
        child(args.child, args.call_reps if args.child == "call" else 1, args.json)
        return

    mallocs = ["off", "on"] if args.malloc == "both" else [args.malloc]
    if "on" in mallocs and not os.path.exists(TCMALLOC):
        sys.exit(f"{TCMALLOC} is missing: apt-get install -y libtcmalloc-minimal4 (or --malloc off)")
    records: list[dict] = []
    started, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for section in args.sections:
                for malloc in mallocs if rep % 2 == 0 else mallocs[::-1]:
                    env = dict(os.environ)
                    env.pop("LD_PRELOAD", None)
                    if malloc == "on":
                        env["LD_PRELOAD"] = TCMALLOC
                    out = os.path.join(tmp, f"{section}-{malloc}-{rep}.json")
                    print(f"# {section}, malloc {malloc}, rep {rep} ({time.time() - started:.0f} s)", flush=True)
                    subprocess.run([sys.executable, "-m", "bench.rollout_engines", "--child", section, "--json", out,
                                    "--call-reps", str(args.call_reps), "--model", args.model], env=env, cwd=HERE,
                                   check=True)
                    with open(out) as f:
                        for r in json.load(f):
                            r["rep"] = (rep, r["rep"])
                            records.append(r)
    header = (f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}; {time.time() - started:.0f} s in all; "
              f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs)\n")
    parts = [header]
    if any(r["section"] == "call" for r in records):
        parts.append(f"## One call: {CALL_NEW_TOKENS} new tokens forced, sampled at T = 1\n\n" + call_table(records))
    if any(r["section"] == "rollout" for r in records):
        parts.append("## FrozenLake rollout, 32 episodes x up to 5 turns\n\n" + rollout_table(records))
    if len(mallocs) == 2:
        parts.append("## tcmalloc against glibc malloc\n\n" + malloc_ratio_table(records))
    report("\n\n".join(parts) + "\n", args.out)


def report(text: str, out: str | None) -> None:
    """Print a finished report and, with ``out``, write it there."""
    print("\n" + text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
