"""Data-parallel processes: which one am I (rank), how many are we (size), which device is mine.

A plain `python pipeline.py` is a world of one and never touches torch.distributed. Several processes
come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) or from the
tasks of one submitit job (Slurm `--ntasks-per-node`, or the local executor's tasks_per_node):

    torchrun --standalone --nproc_per_node=8 pipeline.py --what=tpre --job=cifar10_dit_edm

Training stages use every process: each draws the whole global batch from the same generators and
keeps its own rows (`World.rows`), so the weights do not depend on the number of processes beyond
float rounding (dropout masks excepted). Other stages run on rank 0 while the rest wait; only rank 0
writes files.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mucs.diffusion import per_sample_loss
from mucs.errors import UserError

# Rank 0 may attribute or generate for hours while the others wait between stages: their barrier uses
# its own CPU group with a long timeout, so the default (short) timeout keeps catching hung collectives.
STAGE_WAIT = datetime.timedelta(minutes=float(os.environ.get("MUCS_STAGE_WAIT_MIN", 24 * 60)))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    def rows(self, n):
        """This rank's rows of a global batch of n: contiguous, sizes differing by at most one."""
        lo, hi = self.rank * n // self.size, (self.rank + 1) * n // self.size
        return slice(lo, hi)

    def barrier(self):
        if self.size > 1:
            dist.barrier(group=_groups["stage"])

    def sum(self, value):
        """The sum of a float over all processes (the value itself in a world of one)."""
        if self.size == 1:
            return value
        t = torch.tensor(float(value), dtype=torch.float64, device=_groups["device"])
        dist.all_reduce(t)
        return t.item()


_groups = {}


def world_from_env():
    """The World this process belongs to, read from torchrun's or submitit's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        if submitit.JobEnvironment().num_tasks > 1:
            e = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return World(e.rank, e.world_size, e.local_rank)
    return World()


def local_device(device, world):
    """'cuda' becomes this process's GPU (local rank modulo the visible GPUs, since Slurm may show each
    task only its own)."""
    if world.size > 1 and device == "cuda":
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return device


def init(world, device):
    """Join the process group (NCCL on GPUs, gloo on CPUs) once per process."""
    if world.size == 1 or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.size)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"could not join the {world.size} data-parallel processes as rank {world.rank} "
                        f"({' '.join(str(e).split())[:160]}); check MASTER_ADDR/MASTER_PORT or start with torchrun")
    _groups["stage"] = dist.new_group(backend="gloo", timeout=STAGE_WAIT)
    _groups["device"] = torch.device(device)


class BatchLoss(nn.Module):
    """The per-sample loss as a module, so DistributedDataParallel can wrap it and average gradients."""

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, y, sigma, eps, labels=None, augment_labels=None):
        return per_sample_loss(self.D, y, sigma, eps, labels, augment_labels)


def data_parallel(D, device, find_unused=False):
    """D's per-sample loss wrapped in DDP (gradients averaged over processes at backward)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(BatchLoss(D), device_ids=ids, find_unused_parameters=find_unused)
