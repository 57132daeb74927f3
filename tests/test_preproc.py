"""The preprocessing scripts run on small copies of the original releases built here in their real formats:
CIFAR-10's pickled python batches (in cifar-10-python.tar.gz or extracted), ArtBench-10's image folders +
metadata csv (extracted or as the .tar), COCO's captions json + jpg folders (or zips)."""
import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mucs.data import load_meta, load_split
from mucs.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "preproc_data"


def script(name):
    spec = importlib.util.spec_from_file_location(f"mucs_preproc_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cifar10, cifar2, artbench10, coco = (script(n) for n in ("cifar10", "cifar2", "artbench10", "coco"))
common = cifar10.common
OFFLINE_URL = "http://127.0.0.1:9/"  # the discard port: connection refused at once, like a machine without internet


def stored(folder):
    return load_meta(folder), load_split(folder, "train"), load_split(folder, "test")


def one_line_error(call, *needles):
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-2


LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_pickle(d):
    """Pickled like the release (protocol 2, numpy arrays under numpy.core.multiarray, byte-string keys)."""
    return pickle.dumps(d, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def make_cifar(root, per_batch=10, n_test=20, archive=True, seed=0):
    """A small cifar-10-python.tar.gz (or extracted cifar-10-batches-py/); returns the raw rows and labels."""
    rng = np.random.default_rng(seed)
    files, rows = {}, {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for name in common.CIFAR10_TRAIN + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        split = "test" if name == "test_batch" else "train"
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = [int(v) for v in (np.arange(n) + len(labels[split])) % 10]
        files[name] = cifar_pickle({b"batch_label": name.encode(), b"labels": lab, b"data": data,
                                    b"filenames": [f"img_{split}_{i}.png".encode() for i in range(n)]})
        rows[split].append(data)
        labels[split] += lab
    files["batches.meta"] = cifar_pickle({b"num_cases_per_batch": per_batch, b"label_names": [s.encode() for s in LABEL_NAMES],
                                          b"num_vis": 3072})
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        path = root / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    else:
        path = root / "cifar-10-batches-py"
        path.mkdir()
        for name, blob in files.items():
            (path / name).write_bytes(blob)
    return path, {s: np.concatenate(rows[s]) for s in rows}, {s: np.array(labels[s]) for s in labels}


def test_cifar10_from_archive_round_trip(tmp_path):
    _, rows, labels = make_cifar(tmp_path / "src")
    assert cifar10.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    meta, train, test = stored(tmp_path / "out")
    assert (meta["name"], meta["num_classes"], meta["cond"], meta["resolution"], meta["channels"]) == ("cifar10", 10, "class", 32, 3)
    assert meta["class_names"] == LABEL_NAMES
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.ids.tolist() == list(range(50)) and test.ids.tolist() == list(range(20))  # official order
    assert train.labels.tolist() == labels["train"].tolist() and test.labels.tolist() == labels["test"].tolist()
    # rows are 1024 red, 1024 green, 1024 blue values, each plane row-major
    r = rows["train"][37]
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 12, 31)]:
        assert train.images[37, c, y, x].item() == r[c * 1024 + y * 32 + x]
    assert np.array_equal(train.images.numpy().reshape(50, -1), rows["train"])
    assert np.array_equal(test.images.numpy().reshape(20, -1), rows["test"])
    f = train.float_images()
    assert f.min() >= -1 and f.max() <= 1


def test_cifar10_from_extracted_folder(tmp_path):
    folder, rows, _ = make_cifar(tmp_path / "src", archive=False)
    assert cifar10.main(["--source_dir", str(folder), "--out", str(tmp_path / "out")]) == 0  # the folder itself
    assert np.array_equal(stored(tmp_path / "out")[1].images.numpy().reshape(50, -1), rows["train"])


def test_cifar10_missing_and_incomplete_source(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: cifar10.main(["--source_dir", str(empty), "--out", str(tmp_path / "out")]),
                   "cifar-10-python.tar.gz", "cifar-10-batches-py", empty, "--download", common.CIFAR10_URL)
    folder, _, _ = make_cifar(tmp_path / "src", archive=False)
    (folder / "data_batch_3").unlink()
    one_line_error(lambda: cifar10.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "out")]),
                   "data_batch_3", "missing")
    assert not (tmp_path / "out" / "meta.json").exists()
    # through the command-line guard: one line on stderr, exit code 2
    assert common.guard(cifar10.main)(["--source_dir", str(empty)]) == 2


def test_cifar_batch_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder, _, _ = make_cifar(tmp_path / "src", archive=False)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    one_line_error(lambda: cifar10.main(["--source_dir", str(folder), "--out", str(tmp_path / "out")]),
                   "not a CIFAR python batch", "refusing")
    assert not marker.exists()


def test_cifar10_download(tmp_path, monkeypatch):
    remote, _, _ = make_cifar(tmp_path / "remote")
    md5 = hashlib.md5(remote.read_bytes()).hexdigest()
    src = tmp_path / "src"
    monkeypatch.setattr(common, "CIFAR10_URL", remote.as_uri())
    monkeypatch.setattr(common, "CIFAR10_MD5", "0" * 32)
    one_line_error(lambda: cifar10.main(["--source_dir", str(src), "--out", str(tmp_path / "out"), "--download"]),
                   "checksum mismatch")
    assert not list(src.glob("*"))  # no partial file left behind
    monkeypatch.setattr(common, "CIFAR10_MD5", md5)
    assert cifar10.main(["--source_dir", str(src), "--out", str(tmp_path / "out"), "--download"]) == 0
    assert (src / "cifar-10-python.tar.gz").read_bytes() == remote.read_bytes()
    assert len(stored(tmp_path / "out")[1]) == 50
    monkeypatch.setattr(common, "CIFAR10_URL", OFFLINE_URL + "cifar-10-python.tar.gz")
    one_line_error(lambda: cifar10.main(["--source_dir", str(tmp_path / "src2"), "--out", str(tmp_path / "o2"), "--download"]),
                   "could not download", "offline")


def test_cifar10_runs_as_a_script(tmp_path):
    make_cifar(tmp_path / "src")
    r = subprocess.run([sys.executable, str(SCRIPTS / "cifar10.py"), "--source_dir", str(tmp_path / "src"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "out") in r.stdout
    r = subprocess.run([sys.executable, str(SCRIPTS / "cifar10.py"), "--source_dir", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: CIFAR-10 source not found") and r.stderr.count("\n") == 1


def test_default_paths():
    args = common.parser("x", "x", "cifar2", source_name="cifar10").parse_args([])
    assert args.out == REPO / "pointer_to" / "data" / "cifar2"
    assert args.source_dir == REPO / "pointer_to" / "data" / "raw" / "cifar10"


def test_cifar2_subset(tmp_path):
    _, rows, labels = make_cifar(tmp_path / "src")
    cand = np.flatnonzero(np.isin(labels["train"], [1, 7]))
    assert len(cand) == 10
    out = tmp_path / "out"
    assert cifar2.main(["--source_dir", str(tmp_path / "src"), "--out", str(out), "--num_train", "6"]) == 0
    meta, train, test = stored(out)
    assert (meta["name"], meta["num_classes"], meta["class_names"]) == ("cifar2", 2, ["automobile", "horse"])
    idx = load_split_extra(out, "train", "source_index")
    assert train.ids.tolist() == list(range(6)) and len(set(idx.tolist())) == 6
    assert set(idx.tolist()) <= set(cand.tolist()) and idx.tolist() == sorted(idx.tolist())
    assert train.labels.tolist() == [int(labels["train"][i] == 7) for i in idx]  # automobile 0, horse 1
    assert np.array_equal(train.images.numpy().reshape(6, -1), rows["train"][idx])
    tidx = load_split_extra(out, "test", "source_index")
    assert tidx.tolist() == np.flatnonzero(np.isin(labels["test"], [1, 7])).tolist()  # the whole test side
    assert test.labels.tolist() == [int(labels["test"][i] == 7) for i in tidx]
    # the subset is fixed by the seed
    assert cifar2.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "again"), "--num_train", "6"]) == 0
    assert load_split_extra(tmp_path / "again", "train", "source_index").tolist() == idx.tolist()
    assert cifar2.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "s1"), "--num_train", "6", "--seed", "1"]) == 0
    assert load_split_extra(tmp_path / "s1", "train", "source_index").tolist() != idx.tolist()
    one_line_error(lambda: cifar2.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--num_train", "11"]),
                   "--num_train 11", "10")


def load_split_extra(folder, split, key):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / f"{split}.safetensors"))[key]


# ---------------------------------------------------------------------------------------------
# images for resize / crop checks


def save_jpg(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95, subsampling=0)


def banded(landscape=True):
    """192x96 (or 96x192): outer 48-px bands red / green, the centre square white over black (landscape) or
    white left of black (portrait). Shorter side to 64 + centre crop must keep exactly the centre square."""
    a = np.zeros((96, 192, 3), np.uint8)
    a[:, :48] = (255, 0, 0)
    a[:, 144:] = (0, 255, 0)
    a[:48, 48:144] = 255
    return a if landscape else a.transpose(1, 0, 2).copy()


def check_banded(img, landscape=True):
    """img uint8 [3, 64, 64]: no red/green anywhere inside, white half and black half where expected."""
    x = img.astype(int)
    if not landscape:
        x = x.transpose(0, 2, 1)  # back to "white on top"
    inner = x[:, 2:-2, 2:-2]
    assert np.abs(inner[0] - inner[1]).max() < 40 and np.abs(inner[1] - inner[2]).max() < 40, "colour bands leaked in"
    assert x[:, 2:29, 2:-2].min() > 215, "white half"
    assert x[:, 36:-2, 2:-2].max() < 40, "black half"


def checker():
    a = ((np.arange(256)[:, None] + np.arange(256)[None]) % 2 * 255).astype(np.uint8)
    return np.repeat(a[:, :, None], 3, axis=2)


def colour(i):
    return np.array([(37 * i + 20) % 256, (91 * i + 60) % 256, (53 * i + 200) % 256], np.uint8)


def solid(i, w, h, mode="RGB"):
    a = np.broadcast_to(colour(i), (h, w, 3)).copy()
    return a if mode == "RGB" else a.mean(2).astype(np.uint8)


def check_solid(img, i, gray=False):
    c = colour(i).astype(float)
    want = np.full(3, c.mean()) if gray else c
    assert np.abs(img.reshape(3, -1).mean(1) - want).max() < 4, (img.reshape(3, -1).mean(1), want)


# ---------------------------------------------------------------------------------------------
# ArtBench-10


ART_ROWS = [  # metadata order (as in ArtBench-10.csv), mixing splits; image content by kind
    ("b1.jpg", "baroque", "train", "solid", (256, 256)),
    ("u1.jpg", "ukiyo_e", "test", "solid", (256, 256)),
    ("a1.jpg", "art_nouveau", "train", "landscape", None),
    ("u2.jpg", "ukiyo_e", "train", "solid", (40, 30)),
    ("b2.jpg", "baroque", "test", "portrait", None),
    ("a2.jpg", "art_nouveau", "test", "solid", (300, 200)),
    ("u3.jpg", "ukiyo_e", "train", "portrait", None),
    ("a3.jpg", "art_nouveau", "train", "checker", None),
]
STYLES = ["art_nouveau", "baroque", "ukiyo_e"]


def make_artbench(root, tar=False):
    folder = root / "artbench-10-imagefolder-split"
    for i, (name, style, split, kind, size) in enumerate(ART_ROWS):
        arr = solid(i, *size) if kind == "solid" else checker() if kind == "checker" else banded(kind == "landscape")
        save_jpg(folder / split / style / name, arr)
    lines = ["name,artist,url,is_public_domain,length,width,label,split"]
    lines += [f'{n},some-artist,https://uploads.wikiart.org/{n},True,256,256,{s},{sp}' for n, s, sp, _, _ in ART_ROWS]
    (root / "ArtBench-10.csv").write_text("\n".join(lines) + "\n")
    if tar:
        with tarfile.open(root / "artbench-10-imagefolder-split.tar", "w") as tf:
            tf.add(folder, arcname="artbench-10-imagefolder-split")
        import shutil

        shutil.rmtree(folder)


def check_artbench(out):
    meta, train, test = stored(out)
    assert (meta["name"], meta["cond"], meta["resolution"], meta["num_classes"]) == ("artbench10", "class", 64, 3)
    assert meta["class_names"] == STYLES
    for split, s in (("train", train), ("test", test)):
        rows = [(i, r) for i, r in enumerate(ART_ROWS) if r[2] == split]
        assert s.images.shape == (len(rows), 3, 64, 64)
        assert s.ids.tolist() == list(range(len(rows)))
        assert s.labels.tolist() == [STYLES.index(r[1]) for _, r in rows]
        assert load_split_extra(out, split, "source_index").tolist() == [i for i, _ in rows]
        for j, (i, r) in enumerate(rows):  # id j is the j-th row of the split in metadata order
            img = s.images[j].numpy()
            if r[3] == "solid":
                check_solid(img, i)
            elif r[3] == "checker":  # a 1-px checkerboard downscaled 4x is grey with an antialiasing filter
                assert abs(img.mean() - 127.5) < 10 and img.std() < 25
            else:
                check_banded(img, r[3] == "landscape")


def test_artbench_from_folders(tmp_path):
    make_artbench(tmp_path / "src")
    assert artbench10.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    check_artbench(tmp_path / "out")


def test_artbench_from_tar(tmp_path):
    make_artbench(tmp_path / "src", tar=True)
    assert artbench10.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    check_artbench(tmp_path / "out")


def test_artbench_missing(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: artbench10.main(["--source_dir", str(empty), "--out", str(tmp_path / "out")]),
                   "ArtBench-10.csv", "artbench-10-imagefolder-split", "train/<style>/*.jpg", empty, "--download")
    make_artbench(tmp_path / "src")
    (tmp_path / "src" / "artbench-10-imagefolder-split" / "test" / "baroque" / "b2.jpg").unlink()
    one_line_error(lambda: artbench10.main(["--source_dir", str(tmp_path / "src"), "--out", str(tmp_path / "out")]),
                   "test/baroque/b2.jpg", "missing")
    (tmp_path / "only_csv").mkdir()
    (tmp_path / "only_csv" / "ArtBench-10.csv").write_text("name,label,split\n")
    msg = one_line_error(lambda: artbench10.main(["--source_dir", str(tmp_path / "only_csv")]), "artbench-10-imagefolder-split.tar")
    assert "missing ArtBench-10.csv" not in msg
    monkeypatch.setattr(artbench10, "BASE_URL", OFFLINE_URL)
    one_line_error(lambda: artbench10.main(["--source_dir", str(empty), "--download"]), "could not download", OFFLINE_URL)


# ---------------------------------------------------------------------------------------------
# COCO 2017


COCO = {  # image id -> (file size w x h, mode, captions in annotation order)
    "train2017": {42: ((120, 80), "RGB", [f"a cat number {k}" for k in range(5)]),
                  7: ((80, 120), "L", [f"a grey dog {k}" for k in range(7)]),
                  100: ((64, 64), "RGB", [f"a bus {k}" for k in range(6)])},
    "val2017": {9: ((200, 100), "RGB", [f"a tree {k}" for k in range(5)]),
                3: ((64, 90), "RGB", [f"two birds {k}" for k in range(5)])},
}


def enc(texts):
    """A tiny deterministic text encoder: a unit vector per caption."""
    v = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8) for t in texts]) if texts else np.zeros((0, 8))
    return torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=1)


def coco_files():
    """Relative path -> bytes of a small COCO 2017 release; the captions json list images and
    annotations out of id order, as the real ones do."""
    files = {}
    ann_id = 0
    for coco_split, items in COCO.items():
        images, anns = [], []
        for img_id, ((w, h), mode, caps) in items.items():
            fn = f"{img_id:012d}.jpg"
            images.append({"id": img_id, "file_name": fn, "width": w, "height": h, "license": 1})
            buf = io.BytesIO()
            Image.fromarray(solid(img_id, w, h, mode)).save(buf, format="JPEG", quality=95)
            files[f"{coco_split}/{fn}"] = buf.getvalue()
        for k in range(7):  # round robin over images, as the real file interleaves them
            for img_id, (_, _, caps) in items.items():
                if k < len(caps):
                    ann_id += 1
                    anns.append({"image_id": img_id, "id": ann_id, "caption": caps[k] + " "})
        files[f"annotations/captions_{coco_split}.json"] = json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": anns}).encode()
    return files


def write_tree(root, files, pick):
    for rel, blob in files.items():
        if pick(rel):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)


def write_zip(path, files, pick):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for rel, blob in files.items():
            if pick(rel):
                zf.writestr(rel, blob)


def check_coco(out):
    meta, train, test = stored(out)
    assert (meta["name"], meta["cond"], meta["cond_dim"], meta["num_classes"], meta["max_captions"]) == ("coco", "text", 8, 0, 7)
    captions = json.loads((out / "captions.json").read_text())
    for split, coco_split, s in (("train", "train2017", train), ("test", "val2017", test)):
        items = COCO[coco_split]
        order = sorted(items)
        n = len(order)
        assert s.images.shape == (n, 3, 64, 64) and s.ids.tolist() == list(range(n))
        assert load_split_extra(out, split, "source_index").tolist() == order
        assert s.labels.tolist() == [-1] * n
        assert s.conds.shape == (n, 7, 8) and s.conds.dtype == torch.float32
        assert s.conds_count.tolist() == [len(items[i][2]) for i in order]
        for j, img_id in enumerate(order):
            (_, mode, caps) = items[img_id]
            check_solid(s.images[j].numpy(), img_id, gray=mode == "L")
            assert captions[split][j] == caps
            torch.testing.assert_close(s.conds[j, :len(caps)], enc(caps))
            assert (s.conds[j, len(caps):] == 0).all()


def test_coco_folders_and_zip(tmp_path, monkeypatch):
    monkeypatch.setattr(coco, "ENCODE_CHUNK", 2)  # several encoder calls per split, scattered back in place
    files = coco_files()
    src = tmp_path / "src"
    write_tree(src, files, lambda r: not r.startswith("val2017/"))
    write_zip(src / "val2017.zip", files, lambda r: r.startswith("val2017/"))
    assert coco.main(["--source_dir", str(src), "--out", str(tmp_path / "out")], text_encoder=enc) == 0
    check_coco(tmp_path / "out")


def test_coco_missing_sources_and_encoder(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: coco.main(["--source_dir", str(empty), "--out", str(tmp_path / "out")], text_encoder=enc),
                   "captions_train2017.json", "train2017/", "val2017/", "val2017.zip", empty, "--download")
    files = coco_files()
    src = tmp_path / "src"
    write_tree(src, files, lambda r: not r.startswith("val2017/"))
    msg = one_line_error(lambda: coco.main(["--source_dir", str(src)], text_encoder=enc), "val2017")
    assert "train2017/" not in msg
    write_tree(src, files, lambda r: r.startswith("val2017/") and not r.endswith("000000000009.jpg"))
    one_line_error(lambda: coco.main(["--source_dir", str(src), "--out", str(tmp_path / "out")], text_encoder=enc),
                   "000000000009.jpg", "missing")
    # no injected encoder: the CLIP text encoder is looked up first, and its absence is one line
    for k in ("MUCS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    one_line_error(lambda: coco.main(["--source_dir", str(src), "--out", str(tmp_path / "out"), "--cache_dir", str(empty)]),
                   "CLIP", "open_clip_model.safetensors", empty / "open_clip")
    assert not (tmp_path / "out").exists()


def test_coco_download(tmp_path, monkeypatch):
    files = coco_files()
    remote = tmp_path / "remote"
    write_zip(remote / "annotations_trainval2017.zip", files, lambda r: r.startswith("annotations/"))
    write_zip(remote / "train2017.zip", files, lambda r: r.startswith("train2017/"))
    write_zip(remote / "val2017.zip", files, lambda r: r.startswith("val2017/"))
    monkeypatch.setattr(coco, "URLS", {k: (remote / k).as_uri() for k in coco.URLS})
    src = tmp_path / "src"
    assert coco.main(["--source_dir", str(src), "--out", str(tmp_path / "out"), "--download"], text_encoder=enc) == 0
    assert sorted(p.name for p in src.iterdir()) == ["annotations_trainval2017.zip", "train2017.zip", "val2017.zip"]
    check_coco(tmp_path / "out")
    monkeypatch.setattr(coco, "URLS", {k: OFFLINE_URL + k for k in coco.URLS})
    one_line_error(lambda: coco.main(["--source_dir", str(tmp_path / "src2"), "--download"], text_encoder=enc),
                   "could not download", "offline")


def test_coco_text_encoder_option(tmp_path):
    files = coco_files()
    write_tree(tmp_path / "src", files, lambda r: True)
    one_line_error(lambda: coco.main(["--source_dir", str(tmp_path / "src"), "--text_encoder", "no_such_module:f"]),
                   "--text_encoder", "MODULE:FUNCTION")


def test_coco_with_the_clip_text_encoder_of_mucs_pretrained(tmp_path, monkeypatch):
    """The default encoder path: mucs.pretrained's CLIP text encoder, here a tiny open_clip model saved as
    the ViT-L-14 checkpoint in the cache folder."""
    import open_clip
    import open_clip.factory
    from safetensors.torch import save_file

    from mucs import pretrained as P

    tiny = {"embed_dim": 12, "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, P.CLIP_ARCH, tiny)
    torch.manual_seed(0)
    model = open_clip.create_model(P.CLIP_ARCH).eval()
    (tmp_path / "cache" / "open_clip").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "cache" / "open_clip" / "open_clip_model.safetensors"))
    write_tree(tmp_path / "src", coco_files(), lambda r: True)
    out = tmp_path / "out"
    assert coco.main(["--source_dir", str(tmp_path / "src"), "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                      "--device", "cpu"]) == 0
    meta, train, _ = stored(out)
    assert meta["cond_dim"] == 12 and train.conds.shape == (3, 7, 12)
    caps = COCO["train2017"][7][2]  # image id 7 is id 0 (smallest COCO id)
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer(P.CLIP_ARCH)(caps), normalize=True)
    torch.testing.assert_close(train.conds[0, :7], ref, atol=1e-5, rtol=1e-4)
