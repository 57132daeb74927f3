#!/usr/bin/env python
"""Counterfactual evaluation: python eval.py --jobs=<job>_s1_...,<job>_s2_... --methods=random,<m> [--metrics=...]"""
import sys

from mucs.cli import run_eval

if __name__ == "__main__":
    sys.exit(run_eval())
