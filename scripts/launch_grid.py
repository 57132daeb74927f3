#!/usr/bin/env python
"""Submit whole pipelines to Slurm: jobs x seeds x methods, the pre stages (tpre, gpre) once per (job, seed).

    python scripts/launch_grid.py --jobs=digits_dit_edm --methods=random,mucs --seeds=1-3 [--dry_run] [key=value ...]
"""
import sys

from mucs.cli import grid_main, guard

if __name__ == "__main__":
    sys.exit(guard(grid_main)())
