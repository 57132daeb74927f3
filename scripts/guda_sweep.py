#!/usr/bin/env python
"""GUDA settings compared on a run that has no LOGO models (label proxy), and against LOGO where it exists:

    python scripts/guda_sweep.py --job=digits_dit_edm --seed=3 --variants="attrib.alpha=0.03;attrib.alpha=1.0"
"""
import sys

from mucs.cli import guard, sweep_main

if __name__ == "__main__":
    sys.exit(guard(sweep_main)())
