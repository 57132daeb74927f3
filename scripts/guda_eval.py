#!/usr/bin/env python
"""Group attribution against LOGO:

    python scripts/guda_eval.py --jobs=<job>_s1_...,<job>_s2_... --methods=guda,random,pixel,mucs [--aggregate=mean]
"""
import sys

from mucs.cli import group_eval_main, guard

if __name__ == "__main__":
    sys.exit(guard(group_eval_main)())
