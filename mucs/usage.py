"""Seconds and peak memory of a block of work, for the logs of long steps (e.g. fitting influence factors).

On CUDA the peak is torch's peak allocation on the device. On a CPU it is the process's peak resident memory
during the block: on Linux the high-water mark is reset at the start (/proc/self/clear_refs), elsewhere it is the
process's peak so far, which can only overstate the block's.
"""
import contextlib
import resource
import time
from pathlib import Path

import torch


def _rss_peak_mb(reset=False):
    status = Path("/proc/self/status")
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak resident set size
        line = next(li for li in status.read_text().splitlines() if li.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def measured(device="cpu"):
    """`with measured(device) as u:` ... then u["seconds"] and u["peak_mb"] hold the block's wall time and peak
    memory (MB: device memory on CUDA, resident memory on CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _rss_peak_mb(reset=True)
    out, t0 = {}, time.perf_counter()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else _rss_peak_mb())
