#!/usr/bin/env python
"""What each method attributed, as one self-contained HTML page: python report.py --eval=<eval.py --fn_out name>"""
import sys

from mucs.reporting import run_report

if __name__ == "__main__":
    sys.exit(run_report())
