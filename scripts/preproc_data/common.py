"""Shared parts of the dataset preprocessing scripts: the command line, reading an original release from
its extracted folder or straight from its archive, downloading, resize + centre crop, and CIFAR's
pickled python batches (read without ever running pickled code)."""
import argparse
import hashlib
import io
import os
import pickle
import sys
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mucs.cli import Parser, guard  # noqa: E402
from mucs.data import write_dataset  # noqa: E402
from mucs.errors import UserError  # noqa: E402


def default_out(name):
    return REPO / "pointer_to" / "data" / name


def default_source(name):
    return REPO / "pointer_to" / "data" / "raw" / name


def parser(prog, description, name, source_name=None):
    p = Parser(prog=prog, description=description)
    p.add_argument("--source_dir", type=Path, default=default_source(source_name or name),
                   help=f"folder with the original files (default pointer_to/data/raw/{source_name or name})")
    p.add_argument("--out", type=Path, default=default_out(name), help=f"output dataset folder (default pointer_to/data/{name})")
    p.add_argument("--download", action="store_true",
                   help="first download the missing original files from the official source into --source_dir")
    return p


def save(out, meta, splits, resolution):
    """Write the stored dataset and say what went where."""
    write_dataset(out, meta, splits)
    sizes = ", ".join(f"{k} {len(v['ids'])}" for k, v in splits.items())
    print(f"wrote {meta['name']} ({sizes} items, {resolution} px, cond {meta.get('cond', 'none')}) to {out}")


# ---------------------------------------------------------------------------------------------
# downloading


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, md5=None):
    """Fetch url to dest (atomically, with a progress bar); check the md5 where the source publishes one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}")
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "mucs-preproc/0.1"})
        with urllib.request.urlopen(req, timeout=60) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}); if this machine is offline, fetch the file "
                        f"elsewhere, put it in {dest.parent} and rerun without --download")
    if md5 and md5sum(part) != md5:
        part.unlink(missing_ok=True)
        raise UserError(f"checksum mismatch for {url} (expected md5 {md5}); the download is corrupted: rerun with --download")
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# reading an original release: an extracted folder, a .zip or a .tar(.gz), all by relative path


class Source:
    """Files of a release by relative posix path; reads are serialised so threads can share it."""

    def __init__(self, path):
        self.path, self._lock = Path(path), threading.Lock()
        if self.path.is_dir():
            self.kind = "dir"
        elif zipfile.is_zipfile(self.path):
            self.kind, self._zip = "zip", zipfile.ZipFile(self.path)
            self._names = {n.rstrip("/") for n in self._zip.namelist()}
        else:
            try:
                self.kind, self._tar = "tar", tarfile.open(self.path)
                self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError) as e:
                raise UserError(f"{self.path} is neither a folder, a zip nor a tar archive ({e}); download it again")

    def has(self, rel):
        if self.kind == "dir":
            return (self.path / rel).is_file()
        return rel in (self._names if self.kind == "zip" else self._members)

    def read(self, rel):
        with self._lock:
            try:
                if self.kind == "dir":
                    return (self.path / rel).read_bytes()
                if self.kind == "zip":
                    return self._zip.read(rel)
                return self._tar.extractfile(self._members[rel]).read()
            except (KeyError, OSError, zipfile.BadZipFile, tarfile.TarError) as e:
                raise UserError(f"cannot read {rel} from {self.path} ({e.__class__.__name__}); the copy is incomplete or "
                                f"corrupted: replace it (or rerun with --download)")

    def __str__(self):
        return str(self.path)


def find_source(candidates, required):
    """The first candidate (folder or archive path, prefix inside it) that holds every required file."""
    for path, prefix in candidates:
        if path.exists():
            src = Source(path)
            if all(src.has(prefix + r) for r in required):
                return src, prefix
    return None, None


def missing_in(candidates, required):
    """For an error message: which required files the existing candidates lack."""
    out = []
    for path, prefix in candidates:
        if path.exists():
            src = Source(path)
            out += [f"{path}:{prefix + r}" if src.kind != "dir" else str(path / prefix / r)
                    for r in required if not src.has(prefix + r)]
    return out


# ---------------------------------------------------------------------------------------------
# images


def resize_center_crop(img, size):
    """PIL image -> uint8 [3, size, size]: shorter side resized to `size` (Lanczos), then a centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def load_images(source, rels, size, desc, workers=None):
    """Decode and resize files of `source` in order, in threads (PIL releases the GIL); uint8 [N, 3, size, size]."""
    def one(rel):
        data = source.read(rel)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return resize_center_crop(img, size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot decode image {rel} in {source} ({e.__class__.__name__}); the copy is corrupted: replace it")

    out = np.zeros((len(rels), 3, size, size), dtype=np.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:
        for i, a in enumerate(tqdm(ex.map(one, rels), total=len(rels), desc=desc, unit="img")):
            out[i] = a
    return out


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches (shared by cifar10.py and cifar2.py)


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_FILES = CIFAR10_TRAIN + ["test_batch", "batches.meta"]

# what a numpy array inside a (Python 2 or 3) pickle refers to; anything else would be code to run
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_batch(data: bytes, what):
    try:
        d = _DataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise UserError(f"{what} is not a CIFAR python batch ({str(e)[:80] or e.__class__.__name__}); replace the copy")
    if not isinstance(d, dict):
        raise UserError(f"{what} is not a CIFAR python batch (not a dict); replace the copy")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def cifar10_candidates(source_dir):
    d = Path(source_dir)
    return [(d / CIFAR10_FOLDER, ""), (d, ""), (d / CIFAR10_ARCHIVE, CIFAR10_FOLDER + "/")]


def read_cifar10(source_dir, download_missing=False):
    """The official CIFAR-10 split from cifar-10-python.tar.gz or its extracted cifar-10-batches-py/:
    {'train': (uint8 [N, 3, 32, 32], int64 [N]), 'test': (...), 'label_names': [...]}, items in file order
    (train = data_batch_1..5 concatenated), so position = the official index."""
    source_dir = Path(source_dir)
    cands = cifar10_candidates(source_dir)
    src, prefix = find_source(cands, CIFAR10_FILES)
    if src is None and download_missing:
        download(CIFAR10_URL, source_dir / CIFAR10_ARCHIVE, md5=CIFAR10_MD5)
        src, prefix = find_source(cands, CIFAR10_FILES)
    if src is None:
        lacking = missing_in(cands, CIFAR10_FILES)
        detail = f" (incomplete copy, missing: {', '.join(lacking[:6])})" if lacking else ""
        raise UserError(f"CIFAR-10 source not found in {source_dir}{detail}: put {CIFAR10_ARCHIVE} ({CIFAR10_URL}) or its "
                        f"extracted {CIFAR10_FOLDER}/ ({', '.join(CIFAR10_FILES)}) there, pass --source_dir DIR, "
                        f"or rerun with --download")
    out = {}
    for split, names in (("train", CIFAR10_TRAIN), ("test", ["test_batch"])):
        imgs, labels = [], []
        for n in names:
            b = load_batch(src.read(prefix + n), f"{src}/{prefix + n}")
            data, lab = np.asarray(b.get("data")), np.asarray(b.get("labels"), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
                raise UserError(f"{src}/{prefix + n} does not hold uint8 data [N, 3072] with N labels; replace the copy")
            imgs.append(data.reshape(-1, 3, 32, 32))  # rows: 1024 red, 1024 green, 1024 blue, each row-major
            labels.append(lab)
        out[split] = (np.concatenate(imgs), np.concatenate(labels))
    m = load_batch(src.read(prefix + "batches.meta"), f"{src}/{prefix}batches.meta")
    out["label_names"] = [n.decode() if isinstance(n, bytes) else str(n) for n in m.get("label_names", [])]
    out["source"] = str(src)
    return out


def cli(main):
    """`python script.py ...`: a UserError is one line on stderr and exit code 2."""
    sys.exit(guard(main)())


def positive_int(v):
    try:
        n = int(v)
        assert n > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"{v!r} is not a positive integer")
    return n
