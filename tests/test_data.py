"""The stored format, the digits builder and removal by stable id."""
import numpy as np
import pytest
import torch

from mucs.data import build_digits, load_meta, load_split, remove_ids, subsample, write_dataset
from mucs.errors import UserError


def test_digits_split_is_fixed_and_complete(tmp_path):
    build_digits(tmp_path / "a")
    build_digits(tmp_path / "b")
    tr, te = load_split(tmp_path / "a", "train"), load_split(tmp_path / "a", "test")
    assert (len(tr), len(te)) == (1500, 297)
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (1, 8, 8)
    assert torch.equal(tr.ids, torch.arange(1500))
    assert torch.equal(tr.images, load_split(tmp_path / "b", "train").images)  # same on every build
    x = tr.float_images()
    assert x.min() == -1 and x.max() == 1
    meta = load_meta(tmp_path / "a")
    assert meta["num_classes"] == 10 and meta["resolution"] == 8 and meta["channels"] == 1
    # each stored item is the bundled image and label at its recorded source index, and the splits are disjoint
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits
    d = load_digits()
    src = load_file(str(tmp_path / "a" / "train.safetensors"))["source_index"].numpy()
    assert np.allclose(tr.images[:, 0].numpy() / 255 * 16, d.images[src], atol=16 / 255)
    assert np.array_equal(tr.labels.numpy(), d.target[src])
    src_te = load_file(str(tmp_path / "a" / "test.safetensors"))["source_index"].numpy()
    assert not set(src) & set(src_te) and len(set(src) | set(src_te)) == len(d.target)


def test_remove_ids_by_stable_id_not_position(tmp_path):
    imgs = np.arange(6 * 4, dtype=np.uint8).reshape(6, 1, 2, 2)
    write_dataset(tmp_path, dict(name="t"), dict(train=dict(images=imgs, ids=[10, 11, 12, 13, 14, 15], labels=[0] * 6),
                                                 test=dict(images=imgs[:2], ids=[0, 1])))
    s = load_split(tmp_path, "train")
    sub = subsample(s, 4, seed=1)
    kept = remove_ids(sub, [sub.ids[0].item(), sub.ids[2].item()])
    assert set(kept.ids.tolist()) == set(sub.ids.tolist()) - {sub.ids[0].item(), sub.ids[2].item()}
    for i, id_ in enumerate(kept.ids.tolist()):  # images travel with their ids
        assert torch.equal(kept.images[i], s.images[id_ - 10])
    with pytest.raises(UserError, match="not in the training set"):
        remove_ids(s, [99])
    with pytest.raises(UserError, match="empty training set"):
        remove_ids(s, s.ids)


def test_bad_dataset_folders(tmp_path):
    with pytest.raises(UserError, match="missing or incomplete"):
        load_split(tmp_path / "nothing", "train")
    build_digits(tmp_path / "d")
    (tmp_path / "d" / "train.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted or truncated"):
        load_split(tmp_path / "d", "train")
