"""CIFAR-2 (automobile vs horse, the LDS benchmark setup) -> pointer_to/data/cifar2.

    python scripts/preproc_data/cifar2.py [--source_dir DIR] [--out DIR] [--download]
                                          [--num_train 5000] [--num_test 0] [--seed 0]

Reads CIFAR-10 (see cifar10.py; default source pointer_to/data/raw/cifar10). Train: a fixed seeded subset
of --num_train of the 10,000 automobile/horse training images; test: all 2,000 of their test images
(or a seeded subset of --num_test). Labels: automobile 0, horse 1. ids = position within the subset in
official order; `source_index` keeps the CIFAR-10 index.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CLASSES = (1, 7)  # CIFAR-10 automobile, horse


def pick(labels, n, seed, split):
    """Official indices of the CIFAR-2 items kept: n of them (all if n = 0), chosen by `seed`, sorted."""
    cand = np.flatnonzero(np.isin(labels, CLASSES))
    if n == 0 or n == len(cand):
        return cand
    if n > len(cand):
        raise common.UserError(f"--num_{split} {n} is more than the {len(cand)} CIFAR-2 {split} images in the source")
    return np.sort(cand[np.random.default_rng(seed).choice(len(cand), n, replace=False)])


def main(argv=None):
    p = common.parser("cifar2.py", "Preprocess CIFAR-2 (automobile vs horse) into the stored dataset format.",
                      "cifar2", source_name="cifar10")
    p.add_argument("--num_train", type=int, default=5000, help="training items kept (0: all 10,000)")
    p.add_argument("--num_test", type=int, default=0, help="test items kept (0: all 2,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    args = p.parse_args(argv)
    if args.num_train < 0 or args.num_test < 0:
        raise common.UserError("--num_train and --num_test must be >= 0")
    c = common.read_cifar10(args.source_dir, args.download)
    splits = {}
    for s, n, seed in (("train", args.num_train, args.seed), ("test", args.num_test, args.seed + 1)):
        images, labels = c[s]
        idx = pick(labels, n, seed, s)
        splits[s] = dict(images=images[idx], ids=np.arange(len(idx)), labels=(labels[idx] == CLASSES[1]).astype(np.int64),
                         source_index=idx)
    meta = dict(name="cifar2", num_classes=2, cond="class", cond_dim=0, class_names=["automobile", "horse"],
                cifar10_classes=list(CLASSES), num_train=args.num_train, num_test=args.num_test, subset_seed=args.seed,
                source=common.CIFAR10_URL, source_copy=c["source"])
    common.save(args.out, meta, splits, 32)
    return 0


if __name__ == "__main__":
    common.cli(main)
