#!/usr/bin/env bash
# The README's CPU demo figures: ArCHer on multi-turn FrozenLake with the embedded SmolLM2-135M (prints
# validation success before/after and writes outputs/archer_example/frozenlake/learning_curve.png).
cd "$(dirname "$0")/.." && python run_archer_example.py "$@"
