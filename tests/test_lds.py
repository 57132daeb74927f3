"""LDS: the maths against a known linear datamodel, and the lds stage on the tiny config (shards, merge,
resume, the table of every attributed method)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from mucs import lds as L
from mucs.cli import run_pipeline
from mucs.io import load_tensors

# ---------------------------------------------------------------------------------------------
# The maths


def linear_case(n=300, M=48, Q=60, noise=0.05, seed=0):
    """Outputs of a known linear datamodel: f(x; S_i) = sum_{j in S_i} tau(x, j) + small noise."""
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(Q, n, generator=g, dtype=torch.float64)
    masks = L.draw_subsets(n, 0.5, M, seed=3)
    f = masks.double() @ tau.T
    f += noise * f.std() * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return tau, masks, f


def test_lds_of_the_true_datamodel_is_one_and_of_random_scores_zero():
    tau, masks, f = linear_case()
    v = L.lds_per_query(tau, masks, f)
    assert v.shape == (60,) and np.all(v > 0.98), v.min()
    mean, lo, hi = L.bootstrap(v, 500, seed=0)
    assert 0.99 < mean <= 1 and lo <= mean <= hi and lo > 0.98
    # the sign convention: scores of the opposite sign predict the opposite order
    assert np.all(L.lds_per_query(-tau, masks, f) < -0.98)
    # random scores: about 0 (each query's Spearman over 48 subsets has sd ~0.15; the mean of 60 ~0.02)
    rnd = torch.randn(tau.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mean, lo, hi = L.bootstrap(L.lds_per_query(rnd, masks, f), 500, seed=0)
    assert abs(mean) < 0.1 and lo <= mean <= hi and hi - lo < 0.2
    # scores that are right for half the items: in between
    half = tau.clone()
    half[:, ::2] = rnd[:, ::2]
    assert 0.4 < np.mean(L.lds_per_query(half, masks, f)) < 0.9


def test_spearman_rows_matches_scipy_with_ties_and_constant_rows():
    g = np.random.default_rng(0)
    a, b = g.integers(0, 5, (6, 20)).astype(float), g.normal(size=(6, 20))  # ties in a
    a[5] = 2.0  # a constant row ranks nothing
    got = L.spearman_rows(a, b)
    for q in range(5):
        assert got[q] == pytest.approx(spearmanr(a[q], b[q]).statistic, abs=1e-12)
    assert np.isnan(got[5])
    assert np.isnan(L.bootstrap([np.nan, np.nan])[0]) and L.bootstrap([0.5, np.nan, 0.5])[:1] == (0.5,)


def test_subsets_are_seeded_sized_and_independent_of_their_number():
    m = L.draw_subsets(101, 0.5, 6, seed=1)
    assert m.shape == (6, 101) and (m.sum(1) == 50).all()
    assert len({tuple(r.tolist()) for r in m}) == 6
    assert torch.equal(m[:4], L.draw_subsets(101, 0.5, 4, seed=1))
    assert not torch.equal(m, L.draw_subsets(101, 0.5, 6, seed=2))
    from mucs.errors import UserError
    with pytest.raises(UserError, match="alpha"):
        L.draw_subsets(10, 1.0, 4, seed=0)


# ---------------------------------------------------------------------------------------------
# The stage on the tiny config

LDS = ["lds.num_subsets=3", "lds.num_seeds=1", "lds.steps=16", "lds.num_noises=8", "lds.bootstrap=200"]
RUN = "digits_dit_edm_s1_k2.0_na3_sb0"


def test_lds_stage_shards_merge_resume_and_table(tiny, capsys):
    over = tiny + LDS
    logs = Path([o for o in tiny if o.startswith("paths.logs=")][0].split("=", 1)[1])
    assert run_pipeline(["--what=tpre,gpre,a", "--attrib=pixel"] + over) == 0
    assert run_pipeline(["--what=a", "--attrib=random"] + over) == 0
    d, models = logs / f"{RUN}--lds", logs / "digits_dit_edm_s1_sb0--lds-models"
    # shard 0/3 trains and measures unit m0_s0 only, and writes no manifest
    assert run_pipeline(["--what=lds", "--shard=0/3"] + over) == 0
    assert len(list((models / "m0_s0").glob("lds-output-*.safetensors"))) == 1 and not (models / "m1_s0").exists()
    assert not (models / "m0_s0" / "train-state.pt").exists()  # a measured unit keeps its weights, not its resume state
    assert not (d / "lds.manifest.json").exists()
    # merging before the other shards ran names what is missing
    capsys.readouterr()
    assert run_pipeline(["--what=lds", "--shard=-1/3"] + over) == 2
    assert "m1_s0, m2_s0" in capsys.readouterr().err
    # the unsplit run resumes: unit 0 is not trained again
    w0 = (models / "m0_s0" / "model-best.safetensors").stat().st_mtime_ns
    assert run_pipeline(["--what=lds"] + over) == 0
    assert (models / "m0_s0" / "model-best.safetensors").stat().st_mtime_ns == w0
    assert (d / "lds.manifest.json").exists()
    out = load_tensors(d / L.OUTPUTS)
    assert out["f"].shape == (3, 1, 3) and torch.isfinite(out["f"]).all()
    assert (out["subsets"].sum(1) == 750).all() and len(out["train_ids"]) == 1500
    # the stored outputs are minus the mean loss of the queries under each unit's model on the fixed noise
    from mucs import config as C, stages as S
    from mucs.model import load_denoiser
    job = S.Job(C.compose(over))
    x, y = L.queries(job)
    D = load_denoiser(job.cfg.model, job.meta, job.weights(models / "m2_s0"), "cpu")
    assert torch.allclose(L.measure(job, D, x, y).float(), out["f"][2, 0])
    assert out["f"][0, 0].tolist() != out["f"][1, 0].tolist()  # other subsets, other models
    table = pd.read_csv(d / L.TABLE)
    assert set(table.method) == {"pixel", "random"} and table.lds.between(-1, 1).all()
    assert (table.queries == 3).all() and (table.lo <= table.lds).all() and (table.lds <= table.hi).all()
    # a method attributed later joins the table when the (finished) stage is asked again, without retraining
    assert run_pipeline(["--what=a", "--attrib=cond"] + over) == 0
    capsys.readouterr()
    assert run_pipeline(["--what=lds"] + over) == 0
    printed = capsys.readouterr().out
    assert "done already" in printed and "cond" in printed
    assert set(pd.read_csv(d / L.TABLE).method) == {"pixel", "random", "cond"}
    assert (models / "m0_s0" / "model-best.safetensors").stat().st_mtime_ns == w0
    # other LDS settings are refused with the way out
    assert run_pipeline(["--what=lds"] + over + ["lds.num_noises=4"]) == 2
    err = capsys.readouterr().err
    assert "lds" in err and "other" in err and "--force" in err


def test_lds_grows_in_subsets_seeds_and_queries_training_only_new_models(tiny, capsys):
    """More subsets or seeds: the finished stage runs again and trains only the new models; more queries (a run
    with a larger num_attrib): the same models measure the new run's targets, none is trained again."""
    over = tiny + LDS[:1] + ["lds.num_seeds=1", "lds.steps=8", "lds.num_noises=4", "lds.bootstrap=50"]
    logs = Path([o for o in tiny if o.startswith("paths.logs=")][0].split("=", 1)[1])
    models = logs / "digits_dit_edm_s1_sb0--lds-models"
    assert run_pipeline(["--what=tpre,gpre,a", "--attrib=pixel"] + over) == 0
    assert run_pipeline(["--what=lds"] + over) == 0
    stamp = lambda: {p.parent.name: p.stat().st_mtime_ns for p in models.glob("m*/model-last.safetensors")}  # noqa: E731
    before = stamp()
    assert sorted(before) == ["m0_s0", "m1_s0", "m2_s0"]
    capsys.readouterr()
    grown = [o for o in over if not o.startswith("lds.num_subsets")] + ["lds.num_subsets=4"]
    assert run_pipeline(["--what=lds"] + grown) == 0
    assert "done already" not in capsys.readouterr().out
    after = stamp()
    assert sorted(after) == ["m0_s0", "m1_s0", "m2_s0", "m3_s0"] and all(after[k] == v for k, v in before.items())
    out = load_tensors(logs / f"{RUN}--lds" / L.OUTPUTS)
    assert out["f"].shape == (4, 1, 3) and torch.equal(out["subsets"][:3].bool(), L.draw_subsets(1500, 0.5, 3, 0))
    assert (pd.read_csv(logs / f"{RUN}--lds" / L.TABLE).subsets == 4).all()
    # asked again at the grown size it is done; other settings than the extent are still refused
    capsys.readouterr()
    assert run_pipeline(["--what=lds"] + grown) == 0 and "done already" in capsys.readouterr().out
    assert run_pipeline(["--what=lds"] + grown + ["lds.alpha=0.4"]) == 2
    # more queries: a run with 4 targets measures them under the same 4 models, training none of them again
    more = [o for o in grown if not o.startswith("num_attrib")] + ["num_attrib=4"]
    assert run_pipeline(["--what=tpre,gpre,a", "--attrib=pixel"] + more) == 0
    assert run_pipeline(["--what=lds"] + more) == 0
    assert stamp() == after
    out4 = load_tensors(logs / "digits_dit_edm_s1_k2.0_na4_sb0--lds" / L.OUTPUTS)
    assert out4["f"].shape == (4, 1, 4) and (pd.read_csv(logs / "digits_dit_edm_s1_k2.0_na4_sb0--lds" / L.TABLE).queries == 4).all()


def test_units_of_the_layout_before_shared_models_move_over_untrained_and_unmeasured(tiny):
    """An LDS whose units sit in <run>--lds/m<i>_s<j>/ (the layout before the models were shared, their outputs
    not named by query set, no training mark): grown by a subset, it moves them into the shared folder and neither
    trains nor measures them again."""
    over = tiny + ["lds.num_subsets=3", "lds.num_seeds=1", "lds.steps=8", "lds.num_noises=4", "lds.bootstrap=50"]
    logs = Path([o for o in tiny if o.startswith("paths.logs=")][0].split("=", 1)[1])
    models, d = logs / "digits_dit_edm_s1_sb0--lds-models", logs / f"{RUN}--lds"
    assert run_pipeline(["--what=tpre,gpre,a", "--attrib=pixel"] + over) == 0
    assert run_pipeline(["--what=lds"] + over) == 0
    before = load_tensors(d / L.OUTPUTS)["f"]
    for u in sorted(models.glob("m*_s*")):
        [out] = u.glob("lds-output-*.safetensors")
        out.rename(u / L.UNIT_OUTPUT)
        (u / L.MODEL).unlink()
        u.rename(d / u.name)
    old = {u.name: [(u / f).stat().st_mtime_ns for f in ("model-last.safetensors", L.UNIT_OUTPUT)] for u in d.glob("m*_s*")}
    assert sorted(old) == ["m0_s0", "m1_s0", "m2_s0"] and not list(models.glob("m*_s*"))
    grown = [o for o in over if not o.startswith("lds.num_subsets")] + ["lds.num_subsets=4"]
    assert run_pipeline(["--what=lds"] + grown) == 0
    assert not list(d.glob("m*_s*"))
    for name, (weights, output) in old.items():
        [out] = (models / name).glob("lds-output-*.safetensors")
        assert (models / name / "model-last.safetensors").stat().st_mtime_ns == weights, name  # not trained again
        assert out.stat().st_mtime_ns == output, name  # nor measured again
    after = load_tensors(d / L.OUTPUTS)["f"]
    assert after.shape == (4, 1, 3) and torch.equal(after[:3], before)
    assert (models / "m3_s0" / L.MODEL).exists()
