"""The known-answer benchmark (--what=known, eval.py --known): corruptions of the configured size, the customization
fine-tune's data, the rank statistics on hand-made rank lists, and the stage end to end on a planted dataset with
exact duplicates (pixel and kernel rank every given-back item first), resumed after a kill."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY
from mucs import known as K
from mucs import stats
from mucs.cli import run_eval, run_pipeline
from mucs.data import build_digits, load_split, write_dataset

RUN = "digits_dit_edm_s1_k2.0_na3_sb0"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "digits"
    build_digits(folder)
    return load_split(folder, "train"), load_split(folder, "test")


# ---------------------------------------------------------------------------------------------
# corruptions, fine-tune data, statistics


def test_corruptions_change_images_by_the_configured_amount(digits):
    x = digits[0].float_images()[:200]
    g = torch.Generator().manual_seed(0)
    for sigma in (0.05, 0.2):
        rms = (K.corrupt(x, "noise", sigma, g) - x).square().mean().sqrt()
        assert abs(rms / sigma - 1) < 0.02, (sigma, rms)
    s = K.corrupt(x, "shift", 1)
    assert torch.equal(s[..., 1:], x[..., :-1]) and torch.equal(s[..., 0], x[..., 0])
    assert torch.equal(K.corrupt(x, "shift", 2)[..., 2:], x[..., :-2])
    assert torch.equal(K.corrupt(x, "exact", 0), x)
    change = {q: (K.corrupt(x, "jpeg", q) - x).abs().mean().item() for q in (100, 75, 25, 5)}
    assert change[100] < change[75] < change[25] < change[5] and change[100] < 0.02, change
    j = K.corrupt(x, "jpeg", 25)
    assert torch.equal(K.to_uint8(j).float() / 127.5 - 1, j)  # a decoded 8-bit image


def test_customization_fine_tune_sees_the_exemplar(digits):
    from mucs.train import Order

    tr, te = digits
    ex = te.subset([4])
    k = K.finetune_copies(len(tr), 0.1)
    ft = K.with_exemplar(tr, ex, k)
    assert len(ft) == len(tr) + k and abs(k / len(ft) - 0.1) < 1e-3
    assert torch.equal(ft.ids[len(tr):], torch.full((k,), K.EXEMPLAR_ID))
    order, seen = Order(len(ft), 128, seed=1), 0
    for step in range(len(ft) // 128):  # one epoch of the training loop's batches
        batch = ft.subset(order(step))
        seen += int(K.duplicates(batch.images, ex.images[0]).sum())
        assert torch.equal(batch.labels[batch.ids == K.EXEMPLAR_ID], ex.labels.expand(int((batch.ids == -1).sum())))
    assert abs(seen / (len(ft) // 128 * 128) - 0.1) < 0.03, seen
    pool = K.with_exemplar(tr, ex)
    assert len(pool) == len(tr) + 1 and K.duplicates(pool.images, ex.images[0])[-1]


def test_rank_statistics_on_hand_made_ranks():
    assert stats.known_rank([0.3, 0.9, 0.3, 0.1], [True, False, False, False]) == 2  # a tie counts against it
    assert stats.known_rank([0.3, 0.9, 0.9, 0.1], [False, True, True, False]) == 0  # duplicates are all answers
    assert stats.known_rank([1.0] * 5, [True, False, False, False, False]) == 4  # constant scores: last
    s = stats.known_summary([0, 0, 3, 20], 1500, B=200)
    assert s["recall@1"][0] == 0.5 and s["recall@10"][0] == 0.75 and s["recall@1%"][0] == 0.75  # 1% of 1500: 15
    assert s["mrr"][0] == pytest.approx((1 + 1 + 1 / 4 + 1 / 21) / 4)
    assert stats.known_summary([16, 14], [1500, 1501])["recall@1%"][0] == 0.5  # 1% of 1501 rounds up to 16
    lo, hi = stats.known_summary([0] * 6, 1500, B=200)["recall@1"][1:]
    assert lo == hi == 1.0
    # clusters resampled whole: two exemplars of two samples each, one always found, one never
    m, lo, hi = stats.bootstrap([1, 1, 0, 0], B=400, clusters=["a", "a", "b", "b"])
    means = {round(v, 3) for v in np.unique([stats.bootstrap([1, 1, 0, 0], B=1, seed=s, clusters=list("aabb"))[1]
                                             for s in range(40)])}
    assert m == 0.5 and lo == 0.0 and hi == 1.0 and means <= {0.0, 0.5, 1.0}


# ---------------------------------------------------------------------------------------------
# the stage end to end


@pytest.fixture(scope="module")
def planted(tmp_path_factory, digits):
    """A tiny job on 150 digits and exact duplicates of items 0 and 1 (ids 1000, 1001), tpre done."""
    tr, te = digits
    tmp_path = tmp_path_factory.mktemp("known")
    img = torch.cat([tr.images[:150], tr.images[:2]])
    write_dataset(tmp_path / "planted", dict(name="planted", num_classes=10, cond="class"),
                  dict(train=dict(images=img, ids=np.r_[np.arange(150), 1000, 1001],
                                  labels=torch.cat([tr.labels[:150], tr.labels[:2]])),
                       test=dict(images=te.images[:40], ids=np.arange(40), labels=te.labels[:40])))
    over = [o for o in TINY if not o.startswith("train.val_items")] + [
        "data.name=planted", f"data.folder={tmp_path / 'planted'}", "train.val_items=32",
        f"paths.logs={tmp_path / 'logs'}", f"paths.plots={tmp_path / 'plots'}", f"paths.cache={tmp_path / 'cache'}",
        "known.methods=[pixel,kernel,ensemble,clip]", "known.copies.ids=[0,1,7]", "known.copies.noise=[0.05]",
        "known.copies.shift=[]", "known.copies.jpeg=[90]", "known.custom.num_exemplars=1", "known.custom.steps=4",
        "known.custom.num_samples=2", "known.bootstrap=50"]
    assert run_pipeline(["--what=tpre"] + over) == 0
    return over, tmp_path / "logs" / f"{RUN}--known"


def test_pixel_and_kernel_rank_given_back_items_first(planted, capsys):
    over, folder = planted
    assert run_pipeline(["--what=known", "--force"] + over) == 0
    r = pd.read_csv(folder / K.RANKS)
    copies = r[r.case == "copies"]
    assert set(copies.method) == {"pixel", "kernel", "ensemble"} and len(copies) == 3 * 3 * 3  # methods x items x variants
    assert (copies[copies.kind == "exact"]["rank"] == 0).all()  # items 0 and 1 have an exact duplicate: both answers
    assert (copies[copies.kind == "noise"]["rank"] == 0).all()
    assert (copies.candidates == 152).all()
    custom = r[r.case == "custom"]
    assert len(custom) == 3 * 2 and (custom.candidates == 153).all() and set(custom.cluster) == {"exemplar0"}
    skipped = json.loads((folder / K.METHODS).read_text())["skipped"]
    assert list(skipped) == ["clip"] and "weights not found" in skipped["clip"]
    ft = json.loads((folder / "custom000" / K.FINETUNED).read_text())
    assert ft["steps"] == 4 and ft["copies"] == K.finetune_copies(152, 0.1)
    # eval.py --known: the table, every target's rank, the plot
    paths = [o for o in over if o.startswith("paths.")]
    assert run_eval([f"--jobs={RUN}", "--known", "--fn_out=k"] + paths) == 0
    out = folder.parent.parent / "plots" / "k"
    t = pd.read_csv(out / "known.csv")
    exact = t[(t.kind == "exact") & t.method.isin(["pixel", "kernel"])]
    assert (exact["recall@1"] == 1).all() and (exact.mrr == 1).all() and (out / "known_ranks.png").exists()
    assert "recall@1%" in capsys.readouterr().out
    # the report of that folder shows the known-answer section
    from mucs.reporting import write_report
    page = write_report(out, folder.parent).read_text()
    assert "Known-answer evaluation" in page and "known_ranks" in page


def test_known_resumes_after_a_kill_one_part_per_target(planted, monkeypatch):
    from mucs.attrib.pixel import Pixel

    over, folder = planted
    over = [o for o in over if not o.startswith("known.methods")] + ["known.methods=[pixel]"]
    monkeypatch.setattr(Pixel, "batch_targets", 1)
    real, calls = Pixel.score, []

    def score(self, x, labels, index):
        calls.append(int(index[0]))
        if calls == [0, 1, 2, 3]:  # killed while scoring the fourth target
            raise KeyboardInterrupt
        return real(self, x, labels, index)

    monkeypatch.setattr(Pixel, "score", score)
    assert run_pipeline(["--what=known", "--force"] + over) == 130
    assert len(list((folder / "copies" / "pixel" / "attrib-parts").glob("t*.safetensors"))) == 3
    calls.clear()
    assert run_pipeline(["--what=known"] + over) == 0
    assert calls == [3, 4, 5, 6, 7, 8, 0, 1]  # the 9 copies' last 6 targets, then the exemplar's 2 samples
    assert (pd.read_csv(folder / K.RANKS).query("kind == 'exact'")["rank"] == 0).all()
