"""Time the turn-aware estimators against a slow loop reference and against one torch.cumsum.

    python -m bench.bench_estimators                 # B=256, T=8192, ~10 turns per row
    python -m bench.bench_estimators --batch 64 --length 2048 --repeats 3

All timings come from this one run (the machine is noisy, so only the ratios are meaningful).
The loop reference (the same slow per-token code the tests use) runs on a slice of rows and is scaled per
element to the full batch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

from ragen.trainer.core_algos import (
    compute_archer_advantage_return,
    compute_bi_level_gae_advantage_return,
)


def load_references():
    """``reference_archer`` and ``reference_bi_level`` of ``tests/test_core_algos.py``, loaded from its file (the
    name ``tests`` belongs to veRL's installed package, so it is not imported by module name)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "test_core_algos.py")
    spec = importlib.util.spec_from_file_location("_test_core_algos", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_archer, module.reference_bi_level


def make_batch(batch: int, length: int, turns: int, seed: int = 0):
    """Rows of a prompt, then `turns` replies separated by observations, then right padding."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length)
    used = (length * torch.empty(batch).uniform_(0.7, 1.0, generator=gen)).long()  # real length per row
    for b in range(batch):  # building the input is not what we time
        bounds = torch.linspace(0, int(used[b]), 2 * turns + 2).long()
        for t in range(turns):
            start, stop = int(bounds[2 * t + 1]), int(bounds[2 * t + 2])
            mask[b, start:stop] = 1
    rewards = torch.zeros(batch, length)
    ends = mask.bool() & ~torch.cat([mask[:, 1:], torch.zeros(batch, 1)], 1).bool()
    rewards[ends] = torch.randn(int(ends.sum()), generator=gen)
    values = torch.randn(batch, length, generator=gen)
    return rewards, values, mask


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_estimators", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-rows", type=int, default=2, help="rows timed with the loop reference")
    args = parser.parse_args()
    reference_archer, reference_bi_level = load_references()

    rewards, values, mask = make_batch(args.batch, args.length, args.turns)
    mask_bool = mask.bool()
    elements = args.batch * args.length
    cumsum_s = best_time(lambda: torch.cumsum(values, dim=1), args.repeats)
    ref_rows = slice(0, args.reference_rows)
    scale = args.batch / args.reference_rows

    cases = [
        ("archer a=0.1 (gamma=lam=1)", lambda: compute_archer_advantage_return(
            rewards, values, mask_bool, 1.0, 1.0, 0.95, 0.1),
         lambda: reference_archer(rewards[ref_rows], values[ref_rows], mask[ref_rows], 1.0, 1.0, 0.95, 0.1)),
        ("archer a=0.1 (gamma=0.99, lam=0.95)", lambda: compute_archer_advantage_return(
            rewards, values, mask_bool, 0.99, 0.95, 0.95, 0.1),
         lambda: reference_archer(rewards[ref_rows], values[ref_rows], mask[ref_rows], 0.99, 0.95, 0.95, 0.1)),
        ("bi_level_gae (gamma=lam=1)", lambda: compute_bi_level_gae_advantage_return(
            rewards, values, mask_bool, 1.0, 1.0, 0.95),
         lambda: reference_bi_level(rewards[ref_rows], values[ref_rows], mask[ref_rows], 1.0, 1.0, 0.95)),
        ("bi_level_gae (gamma=0.99, lam=0.95)", lambda: compute_bi_level_gae_advantage_return(
            rewards, values, mask_bool, 0.99, 0.95, 0.95),
         lambda: reference_bi_level(rewards[ref_rows], values[ref_rows], mask[ref_rows], 0.99, 0.95, 0.95)),
    ]

    print(f"B={args.batch} T={args.length} turns/row={args.turns} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} ({elements / 1e6:.1f} M elements)")
    print(f"one torch.cumsum over [B, T]: {cumsum_s * 1e3:.2f} ms")
    header = "| estimator | time (ms) | loop reference, scaled (s) | speed-up vs loop | x cumsum |"
    print(header)
    print("|---|---:|---:|---:|---:|")
    for name, fast, slow in cases:
        fast_s = best_time(fast, args.repeats)
        start = time.perf_counter()
        slow()
        slow_s = (time.perf_counter() - start) * scale
        print(f"| {name} | {fast_s * 1e3:.1f} | {slow_s:.1f} | {slow_s / fast_s:,.0f}x | {fast_s / cumsum_s:.1f}x |")


if __name__ == "__main__":
    main()
