#!/usr/bin/env bash
# The README's CPU demo figures: ArCHer on the Bandit with the embedded SmolLM2-135M (prints before/after).
cd "$(dirname "$0")/.." && python run_archer_example.py "$@"
