"""ArtBench-10 -> pointer_to/data/artbench10: the official train/test split (50,000 / 10,000) at 64x64.

    python scripts/preproc_data/artbench10.py [--source_dir DIR] [--out DIR] [--download] [--resolution 64]

--source_dir (default pointer_to/data/raw/artbench10) holds the metadata ArtBench-10.csv (or metadata.csv)
and the 256 px image folders, extracted (artbench-10-imagefolder-split/{train,test}/<style>/<name>, or
{train,test}/ directly) or as artbench-10-imagefolder-split.tar. Each image: shorter side resized to
--resolution, centre crop. ids = order of the split's rows in the metadata; labels = index of the style
in the sorted style names; `source_index` = the metadata row.
"""
import csv
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BASE_URL = "https://artbench.eecs.berkeley.edu/files/"  # no checksums are published for these files
CSV_NAMES = ("ArtBench-10.csv", "metadata.csv")
ARCHIVE = "artbench-10-imagefolder-split.tar"
FOLDER = "artbench-10-imagefolder-split"


def read_metadata(path):
    """Rows of the metadata csv as (row, split, style, name)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    style = "label" if "label" in fields else "style"  # the release names the style column 'label'
    if not {"name", "split", style} <= fields:
        raise common.UserError(f"{path} lacks the columns name, split and label (style): not ArtBench-10's metadata; "
                               f"download {BASE_URL}{CSV_NAMES[0]} again")
    return [(i, r["split"].strip(), r[style].strip(), r["name"].strip()) for i, r in enumerate(reader)]


def locate(source_dir, download):
    d = Path(source_dir)
    csv_path = next((d / n for n in CSV_NAMES if (d / n).is_file()), None)
    cands = [(d / FOLDER, ""), (d, ""), (d / ARCHIVE, FOLDER + "/")]

    def images():
        for path, prefix in cands:
            if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
                return common.Source(path), prefix
            if path.is_file():
                return common.Source(path), prefix
        return None, None

    src, prefix = images()
    if download and csv_path is None:
        csv_path = common.download(BASE_URL + CSV_NAMES[0], d / CSV_NAMES[0])
    if download and src is None:
        common.download(BASE_URL + ARCHIVE, d / ARCHIVE)
        src, prefix = images()
    if csv_path is None or src is None:
        lacking = ([f"{CSV_NAMES[0]} ({BASE_URL}{CSV_NAMES[0]})"] if csv_path is None else []) + \
                  ([f"{ARCHIVE} or its extracted {FOLDER}/ with train/<style>/*.jpg and test/<style>/*.jpg ({BASE_URL}{ARCHIVE})"]
                   if src is None else [])
        raise common.UserError(f"ArtBench-10 source incomplete in {d}: missing {' and '.join(lacking)}; put them there, "
                               f"pass --source_dir DIR, or rerun with --download")
    return csv_path, src, prefix


def main(argv=None):
    p = common.parser("artbench10.py", "Preprocess ArtBench-10 into the stored dataset format.", "artbench10")
    p.add_argument("--resolution", type=common.positive_int, default=64)
    p.add_argument("--workers", type=common.positive_int, default=None, help="decoding threads (default: up to 8)")
    args = p.parse_args(argv)
    csv_path, src, prefix = locate(args.source_dir, args.download)
    rows = read_metadata(csv_path)
    styles = sorted({r[2] for r in rows})
    label = {s: i for i, s in enumerate(styles)}
    if rows and src.kind == "tar":  # archives with or without the top folder
        first = f"{rows[0][1]}/{rows[0][2]}/{rows[0][3]}"
        prefix = next((q for q in (prefix, "") if src.has(q + first)), prefix)
    splits = {}
    for split in ("train", "test"):
        sel = [r for r in rows if r[1] == split]
        if not sel:
            raise common.UserError(f"{csv_path} has no rows with split '{split}'; download {BASE_URL}{CSV_NAMES[0]} again")
        rels = [f"{prefix}{split}/{style}/{name}" for _, _, style, name in sel]
        absent = [r for r in rels if not src.has(r)]
        if absent:
            raise common.UserError(f"{len(absent)} {split} images of the metadata are missing in {src} (e.g. {absent[0]}); "
                                   f"the image folders are incomplete or belong to another release")
        images = common.load_images(src, rels, args.resolution, f"artbench10 {split}", args.workers)
        splits[split] = dict(images=images, ids=np.arange(len(sel)),
                             labels=np.array([label[r[2]] for r in sel], dtype=np.int64),
                             source_index=np.array([r[0] for r in sel], dtype=np.int64))
    meta = dict(name="artbench10", num_classes=len(styles), cond="class", cond_dim=0, class_names=styles,
                source=BASE_URL + ARCHIVE, source_copy=str(src), metadata=str(csv_path),
                preprocessing=f"shorter side to {args.resolution} (Lanczos), centre crop")
    common.save(args.out, meta, splits, args.resolution)
    return 0


if __name__ == "__main__":
    common.cli(main)
