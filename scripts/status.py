#!/usr/bin/env python
"""Each stage of each run folder: done, pending, running, failed (with the log to read), cancelled or missing.

    python scripts/status.py [--logs DIR] [pattern]
"""
import sys

from mucs.cli import guard, status_main

if __name__ == "__main__":
    sys.exit(guard(status_main)())
