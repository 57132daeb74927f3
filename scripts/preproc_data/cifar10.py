"""CIFAR-10 -> pointer_to/data/cifar10: the official 50,000 / 10,000 split at 32x32, ids = official index.

    python scripts/preproc_data/cifar10.py [--source_dir DIR] [--out DIR] [--download]

--source_dir holds cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ (default
pointer_to/data/raw/cifar10); --download fetches the archive from www.cs.toronto.edu (md5-checked).
The class is stored and offered as the condition; the published DiT-EDM job trains unconditionally.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    p = common.parser("cifar10.py", "Preprocess CIFAR-10 into the stored dataset format.", "cifar10")
    args = p.parse_args(argv)
    c = common.read_cifar10(args.source_dir, args.download)
    splits = {s: dict(images=c[s][0], ids=list(range(len(c[s][0]))), labels=c[s][1]) for s in ("train", "test")}
    meta = dict(name="cifar10", num_classes=10, cond="class", cond_dim=0, class_names=c["label_names"],
                source=common.CIFAR10_URL, source_copy=c["source"])
    common.save(args.out, meta, splits, 32)
    return 0


if __name__ == "__main__":
    common.cli(main)
