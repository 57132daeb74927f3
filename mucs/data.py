"""The stored dataset format shared by every dataset, the digits builder, and removal by id.

A dataset is a folder with `meta.json`, `train.safetensors` and `test.safetensors`. Each split holds
  images       uint8  [N, C, H, W]
  ids          int64  [N]        stable id = index in the official split; attribution speaks in these
  labels       int64  [N]        class / style, -1 where there is none
  conds        float32 [N, K, D] optional: K condition vectors per item (e.g. caption embeddings)
  conds_count  int64  [N]        optional: how many of the K rows are real
Images are normalised to [-1, 1] at load time.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mucs.errors import UserError
from mucs.io import load_tensors, read_json, save_tensors, write_json

FORMAT_VERSION = 1
SPLITS = ("train", "test")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W] (or float in [-1, 1]: images handed over in memory, mucs.api)
    ids: torch.Tensor  # int64 [N]
    labels: torch.Tensor  # int64 [N]
    conds: torch.Tensor | None = None  # float32 [N, K, D]
    conds_count: torch.Tensor | None = None  # int64 [N]

    def __len__(self):
        return len(self.ids)

    def subset(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda t: None if t is None else t[index]
        return Split(self.images[index], self.ids[index], self.labels[index], pick(self.conds), pick(self.conds_count))

    def float_images(self):
        """Images in [-1, 1], float32."""
        if self.images.is_floating_point():
            return self.images.float()
        return self.images.float() / 127.5 - 1


def write_dataset(folder, meta: dict, splits: dict):
    """Write a dataset in the stored format into `folder`. `meta`: at least its name, and for class labels
    `num_classes` and `cond: class` (channels and resolution are read from the images). `splits` maps 'train' and
    'test' to dicts of arrays or tensors: `images` uint8 [N, C, H, W], `ids` [N] (unique, stable: attribution
    reports these), optional `labels` [N] (default -1) and `conds` [N, K, D]. meta.json is written last, so a
    folder with it is complete. Returns None; malformed splits raise ValueError."""
    folder = Path(folder)
    for name, s in splits.items():
        t = {k: torch.as_tensor(np.asarray(v)) for k, v in s.items() if v is not None}
        n = len(t["ids"])
        if t["images"].dtype != torch.uint8 or t["images"].ndim != 4 or len(t["images"]) != n:
            raise ValueError(f"{name}: images must be uint8 [N, C, H, W] with N = len(ids)")
        t["ids"] = t["ids"].long()
        t.setdefault("labels", torch.full((n,), -1, dtype=torch.long))
        t["labels"] = t["labels"].long()
        if len(torch.unique(t["ids"])) != n:
            raise ValueError(f"{name}: ids must be unique")
        if "conds" in t:
            t["conds"] = t["conds"].float()
            t.setdefault("conds_count", torch.full((n,), t["conds"].shape[1], dtype=torch.long))
        save_tensors(folder / f"{name}.safetensors", t)
    c, h, w = torch.as_tensor(np.asarray(splits["train"]["images"])).shape[1:]
    meta = dict(meta, format_version=FORMAT_VERSION, channels=int(c), resolution=int(h))
    meta.setdefault("num_classes", 0)
    meta.setdefault("cond", "none")
    meta.setdefault("cond_dim", 0)
    write_json(folder / "meta.json", meta)  # written last: its presence marks a complete dataset


def load_meta(folder):
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        raise UserError(f"dataset folder {folder} is missing or incomplete (no meta.json); "
                        f"run the dataset's preprocessing script in scripts/preproc_data/ first")
    meta = read_json(folder / "meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"dataset {folder} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}; rerun its preprocessing")
    return meta


def split_sizes(folder, expect=None):
    """{split: items} from the split files' headers (nothing loaded), or before the dataset is built from what its
    config expects (data.expect.sizes); {} when neither is known (or a file is unreadable: its reader says so)."""
    from safetensors import safe_open

    try:
        if (Path(folder) / "meta.json").exists():
            out = {}
            for split in ("train", "test"):
                with safe_open(str(Path(folder) / f"{split}.safetensors"), "pt") as f:
                    out[split] = f.get_slice("ids").get_shape()[0]
            return out
    except Exception:  # a corrupted split: the stage that reads it refuses it in its own words
        return {}
    return dict((expect or {}).get("sizes") or {})


def load_split(folder, split) -> Split:
    folder = Path(folder)
    load_meta(folder)
    t = load_tensors(folder / f"{split}.safetensors", what=f"dataset split '{split}'",
                     hint="rerun the dataset's preprocessing script")
    need = {"images", "ids", "labels"}
    if not need <= set(t) or t["images"].dtype != torch.uint8 or t["images"].ndim != 4:
        raise UserError(f"{folder}/{split}.safetensors is not in the stored format (needs uint8 images [N,C,H,W], ids, labels); rerun preprocessing")
    return Split(t["images"], t["ids"], t["labels"], t.get("conds"), t.get("conds_count"))


def remove_ids(split: Split, remove) -> Split:
    """The split without the items whose stable ids are in `remove`."""
    remove = torch.as_tensor(np.asarray(remove), dtype=torch.long).unique()
    unknown = remove[~torch.isin(remove, split.ids)]
    if len(unknown):
        raise UserError(f"{len(unknown)} ids to remove are not in the training set (e.g. {unknown[:5].tolist()}); "
                        f"the ids file belongs to another dataset or subsample: redo the attribution stage")
    keep = ~torch.isin(split.ids, remove)
    if not keep.any():
        raise UserError("removing the attributed ids leaves an empty training set; lower --topk_factor or num_removal")
    return split.subset(torch.nonzero(keep).squeeze(1))


def subsample(split: Split, n: int, seed: int = 0) -> Split:
    """A fixed random subset of n items (n <= 0 or n >= len: everything), kept in id order."""
    if n <= 0 or n >= len(split):
        return split
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[:n].sort().values
    return split.subset(idx)


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 digits, no download


def build_digits(folder, num_test=297, seed=0):
    """Write the digits set in the stored format: a fixed seeded train/test split, ids = original index
    within each split's order of the bundled array (stable across machines)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    perm = np.random.default_rng(seed).permutation(len(images))
    test, train = np.sort(perm[:num_test]), np.sort(perm[num_test:])
    splits = {}
    for name, idx in (("train", train), ("test", test)):
        splits[name] = dict(images=images[idx], ids=np.arange(len(idx)), labels=d.target[idx],
                            source_index=idx)
    write_dataset(folder, dict(name="digits", num_classes=10, cond="class", source="sklearn.datasets.load_digits",
                               split_seed=seed), splits)


BUILDERS = {"digits": build_digits}


def ensure_dataset(name, folder):
    """Build a bundled dataset on first use; for others, check the preprocessed folder exists."""
    folder = Path(folder)
    if not (folder / "meta.json").exists() and name in BUILDERS:
        BUILDERS[name](folder)
    return load_meta(folder)
