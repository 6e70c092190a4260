"""Causal attention forward + backward on the CPU at the main job's training shapes, three ways, in one run.

    python -m bench.attention                        # SmolLM2-135M: 9 heads of 64, 4 rows x 640 tokens, bf16
    python -m bench.attention --dtype fp32 --tokens 1024

Prints milliseconds per layer (forward + backward) and the achieved GFLOP/s of the useful causal work
(QK^T and AV: 2 * 2 * heads * head_dim * T^2 / 2 per row forward, 3x for forward + backward) for

* torch's fused kernel (``scaled_dot_product_attention`` with ``is_causal``: the flash kernel on a CPU),
* torch's reference ``MATH`` backend of the same call,
* a chunked version written with batched matmuls (queries in blocks, each against the keys up to its end,
  softmax in fp32): the alternative one would write to beat the fused kernel,

next to a plain matmul of the same precision on the model's MLP shape, the rate the
``python -m bench.iteration --profile`` shares are read against.  Ratios are what to read: the machine is shared
and noisy.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.iteration import matmul_rate

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal softmax(QK^T / sqrt(d)) V for q, k, v [B, H, T, D], queries in blocks of ``chunk`` rows; each block
    multiplies only the keys up to its own last position (the causal half), scores and softmax in fp32."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    out = []
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)).float() * scale
        allowed = torch.ones(end - start, end, dtype=torch.bool).tril(start)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
        out.append(probs @ v[:, :, :end])
    return torch.cat(out, dim=2)


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def math_backend(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_fwd_bwd(fn, shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> float:
    """Best seconds of one forward + backward of ``fn`` over ``repeats`` (after one warm-up call)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True) for _ in range(3))
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn(q, k, v).float().sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4, help="rows per micro-batch (the main job's micro_batch_size)")
    p.add_argument("--tokens", type=int, default=640, help="tokens per row (the main job's mean row)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1536, help="the MLP width of the reference matmul")
    p.add_argument("--chunk", type=int, default=160, help="query block of the chunked version")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    for name in ("rows", "tokens", "heads", "head_dim", "intermediate", "chunk", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    dtype = DTYPES[args.dtype]
    shape = (args.rows, args.heads, args.tokens, args.head_dim)
    useful = 3 * 2 * args.rows * args.heads * args.head_dim * args.tokens ** 2  # causal fwd: 2 matmuls x half
    hidden = args.heads * args.head_dim
    peak = matmul_rate(args.rows * args.tokens, hidden, args.intermediate, dtype, args.repeats)
    mm = f"{args.rows * args.tokens} x {hidden} x {args.intermediate}"
    print(f"causal attention fwd + bwd, {args.dtype}, {torch.get_num_threads()} threads, rows x heads x tokens x "
          f"head_dim = {' x '.join(map(str, shape))}; matmul {mm}: {peak:.0f} GFLOP/s\n")
    print("| kernel | ms per layer | GFLOP/s (useful causal work) | share of matmul rate | vs fused |")
    print("|---|---:|---:|---:|---:|")
    fused_s = None
    for label, fn in (("fused (flash) kernel", fused), ("MATH backend", math_backend),
                      (f"chunked bmm, blocks of {args.chunk}",
                       lambda q, k, v: chunked_causal_attention(q, k, v, args.chunk))):
        secs = time_fwd_bwd(fn, shape, dtype, args.repeats)
        fused_s = fused_s or secs
        rate = useful / secs / 1e9
        print(f"| {label} | {1e3 * secs:.0f} | {rate:.0f} | {100 * rate / peak:.0f} % | {fused_s / secs:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
