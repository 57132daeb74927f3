"""COCO 2017 -> pointer_to/data/coco: train2017 (118,287) and val2017 (5,000, the test split) at 64x64, each
image with the CLIP ViT-L-14 (laion2b_s32b_b82k) embeddings of its captions as conditions.

    python scripts/preproc_data/coco.py [--source_dir DIR] [--out DIR] [--download] [--resolution 64]
        [--cache_dir DIR] [--device cpu|cuda] [--batch 256] [--text_encoder MODULE:FUNCTION]

--source_dir (default pointer_to/data/raw/coco) holds annotations/captions_{train,val}2017.json (or
annotations_trainval2017.zip) and the train2017/, val2017/ image folders (or train2017.zip, val2017.zip).
Images: shorter side to --resolution, centre crop. ids = position in the captions file's `images` list
sorted by image id; `source_index` = the COCO image id. conds [N, K, D]: the L2-normalised embeddings of
the image's captions in annotation order (K = most captions of any image, zero rows beyond
conds_count). The CLIP weights come from mucs.pretrained (--cache_dir); --text_encoder names another
encoder: a function (cache_dir=..., device=...) returning a callable list[str] -> [N, D].
"""
import importlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

URLS = {"annotations_trainval2017.zip": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "train2017.zip": "http://images.cocodataset.org/zips/train2017.zip",
        "val2017.zip": "http://images.cocodataset.org/zips/val2017.zip"}  # cocodataset.org publishes no checksums
SPLITS = {"train": "train2017", "test": "val2017"}
ENCODE_CHUNK = 1024  # images per text-encoder call (up to ~7,000 captions)


def candidates(d):
    """(folder or archive, prefix inside it) per needed part, in order of preference."""
    ann = [(d / "annotations", ""), (d, ""), (d / "annotations_trainval2017.zip", "annotations/")]
    out = {"annotations": ann}
    for coco in SPLITS.values():
        out[coco] = [(d / coco, ""), (d / f"{coco}.zip", f"{coco}/")]
    return out


def locate(source_dir, download):
    d = Path(source_dir)
    cands = candidates(d)

    def find():
        found = {"annotations": common.find_source(cands["annotations"], [f"captions_{c}.json" for c in SPLITS.values()])}
        for coco in SPLITS.values():
            found[coco] = next(((common.Source(p), q) for p, q in cands[coco] if p.exists()), (None, None))
        return found

    found = find()
    if download:
        for part, archive in (("annotations", "annotations_trainval2017.zip"), ("train2017", "train2017.zip"),
                              ("val2017", "val2017.zip")):
            if found[part][0] is None:
                common.download(URLS[archive], d / archive)
        found = find()
    lacking = []
    if found["annotations"][0] is None:
        lacking.append("annotations/captions_train2017.json and annotations/captions_val2017.json "
                       f"(or annotations_trainval2017.zip, {URLS['annotations_trainval2017.zip']})")
    for coco in SPLITS.values():
        if found[coco][0] is None:
            lacking.append(f"{coco}/*.jpg (or {coco}.zip, {URLS[coco + '.zip']})")
    if lacking:
        raise common.UserError(f"COCO 2017 source incomplete in {d}: missing {'; '.join(lacking)}; put them there, "
                               f"pass --source_dir DIR, or rerun with --download")
    return found


def read_captions(src, rel):
    """Images sorted by id, and each image's captions in annotation order."""
    try:
        data = json.loads(src.read(rel))
        images = sorted(data["images"], key=lambda im: im["id"])
        caps = defaultdict(list)
        for a in data["annotations"]:
            caps[a["image_id"]].append(str(a["caption"]).strip())
    except (ValueError, KeyError, TypeError) as e:
        raise common.UserError(f"{src}/{rel} is not a COCO captions file ({e.__class__.__name__}: {str(e)[:60]}); replace it")
    return images, [caps[im["id"]] for im in images]


def make_encoder(args, text_encoder):
    if text_encoder is not None:
        return text_encoder
    if args.text_encoder:
        mod, _, fn = args.text_encoder.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError, ValueError) as e:
            raise common.UserError(f"--text_encoder {args.text_encoder!r} is not an importable MODULE:FUNCTION ({e})")
        return factory(cache_dir=args.cache_dir, device=args.device)
    from mucs.pretrained import load_clip_text_encoder

    return load_clip_text_encoder(args.cache_dir, device=args.device, batch=args.batch)


def embed(encoder, captions, k, desc):
    """Per-image caption lists -> conds float32 [N, k, D] (rows past an image's count stay zero), filled
    a chunk of images at a time so only one copy of the embeddings is ever in memory."""
    conds, chunk = None, ENCODE_CHUNK
    for i in tqdm(range(0, len(captions), chunk), desc=desc, unit="chunk"):
        part = captions[i: i + chunk]
        flat = [c for cs in part for c in cs]
        if not flat:
            continue
        e = encoder(flat)
        e = np.asarray(e.detach().float().cpu() if hasattr(e, "detach") else e, dtype=np.float32)
        if conds is None:
            conds = np.zeros((len(captions), k, e.shape[1]), np.float32)
        start = 0
        for j, cs in enumerate(part):
            conds[i + j, :len(cs)] = e[start: start + len(cs)]
            start += len(cs)
    return conds if conds is not None else np.zeros((len(captions), k, 0), np.float32)


def main(argv=None, text_encoder=None):
    import torch

    p = common.parser("coco.py", "Preprocess COCO 2017 (images + CLIP caption embeddings) into the stored dataset format.", "coco")
    p.add_argument("--resolution", type=common.positive_int, default=64)
    p.add_argument("--cache_dir", default=None, help="folder with the CLIP weights (default: mucs.pretrained's cache)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the text encoder")
    p.add_argument("--batch", type=common.positive_int, default=256, help="captions per text-encoder batch")
    p.add_argument("--text_encoder", default=None, help="MODULE:FUNCTION building another text encoder")
    p.add_argument("--workers", type=common.positive_int, default=None, help="decoding threads (default: up to 8)")
    args = p.parse_args(argv)
    found = locate(args.source_dir, args.download)
    encoder = make_encoder(args, text_encoder)  # before the long image pass: a missing encoder fails at once

    ann, ann_prefix = found["annotations"]
    parts = {}
    for split, coco in SPLITS.items():
        images, captions = read_captions(ann, f"{ann_prefix}captions_{coco}.json")
        src, prefix = found[coco]
        rels = [prefix + im["file_name"] for im in images]
        absent = [r for r in rels if not src.has(r)]
        if absent:
            raise common.UserError(f"{len(absent)} {coco} images listed in captions_{coco}.json are missing in {src} "
                                   f"(e.g. {absent[0]}); the copy is incomplete")
        pixels = common.load_images(src, rels, args.resolution, f"coco {coco}", args.workers)
        parts[split] = (images, captions, pixels)

    k = max(1, max(len(cs) for _, captions, _ in parts.values() for cs in captions))
    splits, texts = {}, {}
    for split, (images, captions, pixels) in parts.items():
        conds = embed(encoder, captions, k, f"embedding {SPLITS[split]} captions")
        count = np.array([len(cs) for cs in captions], dtype=np.int64)
        splits[split] = dict(images=pixels, ids=np.arange(len(images)), labels=np.full(len(images), -1),
                             conds=conds, conds_count=count,
                             source_index=np.array([im["id"] for im in images], dtype=np.int64))
        texts[split] = captions
    dim = splits["train"]["conds"].shape[2]
    from mucs.io import write_json

    write_json(Path(args.out) / "captions.json", texts)  # the caption texts behind conds, by split and id
    meta = dict(name="coco", num_classes=0, cond="text", cond_dim=int(dim), max_captions=int(k),
                text_encoder=args.text_encoder or ("injected" if text_encoder is not None else "open_clip ViT-L-14 laion2b_s32b_b82k"),
                source="https://cocodataset.org (2017 train/val)", source_copy=str(Path(args.source_dir)),
                preprocessing=f"shorter side to {args.resolution} (Lanczos), centre crop")
    common.save(args.out, meta, splits, args.resolution)
    return 0


if __name__ == "__main__":
    common.cli(main)
