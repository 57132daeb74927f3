#!/usr/bin/env python
"""Run stages of one job: python pipeline.py --what=tpre,gpre,a,tpost,gpost --job=digits_dit_edm --seed=1 --attrib=random"""
import sys

from mucs.cli import run_pipeline

if __name__ == "__main__":
    sys.exit(run_pipeline())
