"""How the numbers are computed: mixed precision, TF32, and the numerics a cache or a resumable part records,
so that a reader never combines numbers computed under other numerics with its own.

TF32 is on for training and sampling (precision.tf32: speed, and its rounding is absorbed by training) and off
for scores by default (precision.score_tf32): attribution scores and LDS measurements are small differences of
losses, which TF32's 10-bit mantissa can drown.
"""
import contextlib

import torch


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, None)
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@contextlib.contextmanager
def tf32(on):
    """TF32 matmuls and convolutions on CUDA while inside (the flags are set on any device; only CUDA reads them)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def scoring(cfg):
    """The precision of scores (attribution, LDS and LOGO measurements): TF32 as precision.score_tf32 says."""
    return tf32(cfg.precision.score_tf32)


def numerics(device, autocast_dtype="none", dtype=torch.float32):
    """What numbers computed now on `device` depend on beyond their inputs: device type, parameter dtype, mixed
    precision and TF32 (as in force now)."""
    return dict(device=torch.device(device).type, dtype=str(dtype).replace("torch.", ""), autocast=str(autocast_dtype),
                tf32=bool(torch.backends.cuda.matmul.allow_tf32))
