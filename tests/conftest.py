import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = ["slurm_cluster"]


def pytest_collection_modifyitems(config, items):
    import torch
    skip_gpu = pytest.mark.skip(reason="needs CUDA; torch finds no GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def write_planted(folder, n_train):
    """The planted known-answer dataset: `n_train` digits plus 6 noisy copies of one held-out digit (ids
    1000-1005); the test split starts with a 7th copy, so the first target's copies are the right answer."""
    import numpy as np
    from mucs.data import build_digits, load_split, write_dataset
    build_digits(folder.parent / "digits")
    tr, te = load_split(folder.parent / "digits", "train"), load_split(folder.parent / "digits", "test")
    rng = np.random.default_rng(0)
    base = te.images[0].numpy().astype(int)
    copies = np.stack([np.clip(base + rng.integers(-8, 9, base.shape), 0, 255) for _ in range(7)]).astype(np.uint8)
    write_dataset(folder, dict(name="planted", num_classes=10, cond="class", resolution=8, channels=1),
                  dict(train=dict(images=np.concatenate([tr.images[:n_train].numpy(), copies[:6]]),
                                  ids=np.r_[np.arange(n_train), np.arange(1000, 1006)],
                                  labels=np.r_[tr.labels[:n_train].numpy(), [int(te.labels[0])] * 6]),
                       test=dict(images=np.concatenate([copies[6:], te.images[1:40].numpy()]), ids=np.arange(40),
                                 labels=np.r_[int(te.labels[0]), te.labels[1:40].numpy()])))
    return folder


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """One digits dataset for the whole session (built from scikit-learn's bundled copy)."""
    return tmp_path_factory.mktemp("data")


TINY = ["train.steps=24", "train.epoch_steps=8", "train.ckpt_every=4", "train.batch=32", "train.warmup_steps=4",
        "model.net_kwargs.width=32", "model.net_kwargs.depth=1", "model.net_kwargs.heads=2",
        "model.net_kwargs.cond_width=32", "model.net_kwargs.front_channels=8", "model.net_kwargs.extra_tokens=2",
        "num_attrib=3", "control_factor=1.0", "sample.num_steps=4", "data.num_removal_base=5",
        "train.val_items=64"]


@pytest.fixture
def tiny(tmp_path, data_root):
    """Overrides for a seconds-long run of the real pipeline in a fresh run folder."""
    return TINY + [f"paths.data={data_root}", f"paths.logs={tmp_path / 'logs'}", f"paths.plots={tmp_path / 'plots'}",
                   f"paths.cache={tmp_path / 'cache'}"]
