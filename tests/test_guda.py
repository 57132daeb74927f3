"""GUDA and LOGO on a planted case: one group (inverted digits) clearly made the queries, and both the
unlearning score and the retraining ground truth must put it first; LOGO's sharded trainings resume; the
group evaluation agrees; groups from labels and tables; the redirect target and the shared-noise score."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mucs.attrib.base import load_attrib
from mucs.attrib.guda import GUDA, group_delbo, redirect_target
from mucs.cli import group_eval_main, guard, run_pipeline, sweep_main
from mucs.config import compose
from mucs.data import build_digits, ensure_dataset, load_split, write_dataset
from mucs.errors import UserError
from mucs.groups import collapse, expand, load_groups
from mucs.io import file_hash, load_tensor_metadata, save_tensors
from mucs.logo import load_logo
from mucs.model import labels_of
from mucs.stages import Job, attrib_context

RUN = "digits_dit_edm_s1_k2.0_na3_sb0"
FAST = ["attrib.lr=1e-3", "attrib.alpha=1", "attrib.epochs=3", "attrib.pairs=32", "attrib.batch=32"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """400 digits in groups d0 (even labels) and d1 (odd), and 150 inverted digits in group inv; 12 queries that
    are noisy copies of inverted training digits."""
    root = tmp_path_factory.mktemp("guda")
    build_digits(root / "digits")
    tr, te = load_split(root / "digits", "train"), load_split(root / "digits", "test")
    n, m = 400, 150
    imgs = np.concatenate([tr.images[:n].numpy(), 255 - tr.images[n:n + m].numpy()])
    labels, ids = tr.labels[:n + m].numpy(), np.arange(n + m)
    write_dataset(root / "p", dict(name="planted", num_classes=10, cond="class"),
                  dict(train=dict(images=imgs, ids=ids, labels=labels),
                       test=dict(images=te.images[:60].numpy(), ids=np.arange(60), labels=te.labels[:60].numpy())))
    groups = [f"d{lab % 2}" for lab in labels[:n]] + ["inv"] * m
    (root / "table.csv").write_text("id,group\n" + "".join(f"{i},{g}\n" for i, g in zip(ids, groups)))
    x = torch.as_tensor(imgs[n: n + 12]).float() / 127.5 - 1
    x = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    save_tensors(root / "queries.safetensors", dict(images=x))
    return root


@pytest.fixture(scope="module")
def job(planted):
    from conftest import TINY
    logs = planted / "logs"
    return TINY + [f"paths.logs={logs}", f"paths.plots={logs}/plots", f"paths.cache={logs}/cache", "data.name=planted",
                   f"data.folder={planted / 'p'}", "train.epoch_steps=12", "train.ema=0.8", "groups.source=table",
                   f"groups.table={planted / 'table.csv'}", f"targets={planted / 'queries.safetensors'}"]


def test_planted_group_first_for_guda_and_logo_and_logo_resumes(job, planted, capsys):
    logs = planted / "logs"
    assert run_pipeline(["--what=tpre,a", "--attrib=guda"] + job + FAST) == 0
    post = logs / f"{RUN}--post_guda"
    log = [json.loads(r) for r in (post / "attrib_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[0]["groups"] == ["d0", "d1", "inv"]
    assert sum(r["top_group"] == "inv" for r in log) >= 11, [r["group_scores"] for r in log]
    # the item-level view: every item carries its group's score, so the inverted digits rank first
    att = load_attrib(post)
    inv = att["train_ids"] >= 400
    assert torch.allclose(att["scores"][:, inv], att["scores"][:, inv][:, :1].expand(-1, int(inv.sum())))
    assert (att["top_ids"] >= 400).float().mean() >= 11 / 12
    for m in ("random", "pixel"):
        assert run_pipeline(["--what=a", f"--attrib={m}"] + job) == 0

    # LOGO: one shard trains its group only; the merge refuses while groups are missing; the full run resumes
    assert run_pipeline(["--what=logo", "--shard=1/3"] + job) == 0
    lf = logs / f"{RUN}--logo"
    g1 = lf / "g001" / "model-best.safetensors"
    assert g1.exists() and not (lf / "g000" / "model-best.safetensors").exists()
    assert not (lf / "logo.manifest.json").exists()
    h1 = file_hash(g1)
    capsys.readouterr()
    assert run_pipeline(["--what=logo", "--shard=-1/3"] + job) == 2
    assert "not trained yet" in capsys.readouterr().err
    assert run_pipeline(["--what=logo"] + job) == 0
    out = capsys.readouterr().out
    assert "[logo d1] already trained" in out and file_hash(g1) == h1
    assert not list(lf.glob("g*/train-state.pt"))  # finished models keep weights, not their resume state
    L, meta = load_logo(lf)
    assert L["scores"].shape == (12, 3) and meta["groups"] == ["d0", "d1", "inv"]
    assert (L["scores"].argmax(1) == 2).float().mean() >= 11 / 12, L["scores"]
    assert L["train_seconds"].shape == (3,) and (L["train_seconds"] > 0).all()
    assert run_pipeline(["--what=logo"] + job) == 0 and "done already" in capsys.readouterr().out

    # group evaluation: GUDA agrees with LOGO on the planted group; tables and the saved group views
    assert group_eval_main(["--jobs=*", "--methods=guda,random,pixel", f"--logs={logs}", "--fn_out=g",
                            f"paths.plots={logs}/plots"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "spearman" in out
    s = pd.read_csv(logs / "plots" / "g" / "group_summary.csv").set_index("method")
    assert s.loc["guda", "top1"] >= 11 / 12 and s.loc["guda", "mrr"] >= s.loc["guda", "top1"]
    for c in ("top1", "mrr", "ndcg@3", "top3_overlap", "rbo"):
        assert s[c].between(0, 1).all(), c
    t = pd.read_csv(logs / "plots" / "g" / "group_times.csv")
    assert t.speedup.iloc[0] > 0 and t.guda_unlearn_s.iloc[0] > 0
    g = load_tensor_metadata(post / "group_scores.safetensors")
    assert g["groups"] == ["d0", "d1", "inv"] and g["aggregate"] == "mean"


def test_ascent_variant_and_shared_noise(job, planted):
    jb = Job(compose(job + ["attrib=guda", "attrib.objective=ascent"] + FAST))
    if not jb.weights(jb.pre).exists():
        assert run_pipeline(["--what=tpre"] + job) == 0
    ctx = attrib_context(jb)
    m = GUDA(jb.cfg.attrib, ctx)
    x = load_split(planted / "p", "train")
    q = x.subset(torch.arange(400, 412))
    y = labels_of(q, jb.cfg.model, jb.meta)
    G = m.group_scores(q.float_images(), y)
    assert (G.argmax(1) == 2).float().mean() >= 10 / 12, G
    assert len(list(m.paths[0].parent.glob("g*.safetensors"))) == 3  # cached per group in the pre folder
    assert m.paths[0].parent.parent == jb.pre / "guda-cache"
    # the full model against itself: exactly zero on the shared noise, whatever the group
    assert torch.equal(group_delbo(ctx, lambda k: ctx.D, 2, q.float_images(), y), torch.zeros(12, 2))


def test_redirect_target_closed_form():
    g = torch.Generator().manual_seed(0)
    x, r = torch.rand(2, 1, 4, 4, generator=g), torch.rand(2, 1, 1, 4, 4, generator=g)
    sigma, eps = torch.tensor([0.5, 0.05]), torch.randn(2, 1, 4, 4, generator=g)
    x_star, eps_star = redirect_target(x, r, sigma, eps, trust=1e9)  # one neighbour, no clip: x* is that neighbour
    assert torch.allclose(x_star, r[:, 0], atol=1e-6)
    assert torch.allclose(x_star + sigma.view(-1, 1, 1, 1) * eps_star, x + sigma.view(-1, 1, 1, 1) * eps, atol=1e-6)
    x_star, eps_star = redirect_target(x, r, sigma, eps, trust=0.5)  # clipped: ||eps* - eps||_rms = 0.5 at small sigma
    rms = (eps_star - eps).flatten(1).square().mean(1).sqrt()
    assert rms[1] == pytest.approx(0.5, rel=1e-5) and (rms <= 0.5 + 1e-6).all()
    assert torch.allclose(x_star + sigma.view(-1, 1, 1, 1) * eps_star, x + sigma.view(-1, 1, 1, 1) * eps, atol=1e-6)
    # two neighbours: the Gaussian posterior at sigma picks the nearer one as sigma -> 0, their mean as sigma grows
    R2 = torch.stack([x, -x], 1)
    near, _ = redirect_target(x, R2, torch.tensor([1e-2, 1e-2]), torch.zeros_like(x), trust=1e9)
    far, _ = redirect_target(x, R2, torch.tensor([1e3, 1e3]), torch.zeros_like(x), trust=1e9)
    assert torch.allclose(near, x, atol=1e-5) and torch.allclose(far, torch.zeros_like(x), atol=1e-4)


def test_groups_from_labels_tables_and_views(tmp_path, data_root):
    ensure_dataset("digits", data_root / "digits")
    tr = load_split(data_root / "digits", "train")
    meta = dict(name="digits", class_names=[f"c{i}" for i in range(10)])
    g = load_groups(OmegaConf.create(dict(source="label")), tr, meta)
    assert g.names == [f"c{i}" for i in range(10)] and torch.equal(g.index, tr.labels)
    assert int(g.sizes().sum()) == len(tr) and torch.equal(g.members(3), tr.ids[tr.labels == 3])
    t = tmp_path / "t.csv"
    t.write_text("id,group\n" + "".join(f"{i},{'10' if i % 3 else '9'}\n" for i in tr.ids.tolist()))
    g = load_groups(OmegaConf.create(dict(source="table", table=str(t))), tr, meta)
    assert g.names == ["9", "10"] and (g.index == (tr.ids % 3 != 0).long()).all()  # numeric names in number order
    t.write_text("id,group\n0,a\n1,b\n")
    with pytest.raises(UserError, match="have no group"):
        load_groups(OmegaConf.create(dict(source="table", table=str(t))), tr, meta)
    with pytest.raises(UserError, match="label or table"):
        load_groups(OmegaConf.create(dict(source="style")), tr, meta)
    # collapse (sum, mean, max) and expand by hand on 5 items in groups 0, 1, 0, 2, 1
    from mucs.groups import Groups
    gr = Groups(torch.tensor([0, 1, 0, 2, 1]), ["a", "b", "c"], torch.arange(5))
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0, 6.0]])
    assert collapse(s, gr, "sum").tolist() == [[4.0, 8.0, 4.0]]
    assert collapse(s, gr, "mean").tolist() == [[2.0, 4.0, 4.0]]
    assert collapse(s, gr, "max").tolist() == [[3.0, 6.0, 4.0]]
    assert expand(torch.tensor([[7.0, 8.0, 9.0]]), gr).tolist() == [[7.0, 8.0, 7.0, 9.0, 8.0]]


def test_cli_errors(job, planted, capsys):
    assert run_pipeline(["--what=tpre"] + job) == 0  # done already when the tests above ran
    capsys.readouterr()
    # a bad group table is refused before anything is cleared
    assert run_pipeline(["--what=logo", "--force"] + job + ["groups.table=/nonexistent.csv"]) == 2
    assert "group table /nonexistent.csv does not exist" in capsys.readouterr().err
    assert run_pipeline(["--what=logo"] + job) == 0 and "done already" in capsys.readouterr().out
    run_eval = guard(group_eval_main)
    assert run_eval(["--jobs=nothing_here", f"--logs={planted / 'logs'}"]) == 2
    assert "no run folder nothing_here--pre" in capsys.readouterr().err
    assert run_eval(["--jobs=*", "--aggregate=median", f"--logs={planted / 'logs'}"]) == 2


def test_vp_score_is_the_eps_prediction_error(tmp_path, data_root):
    """For a VP model the dELBO is the difference of eps-prediction errors ||eps_hat - eps||^2 on the shared noise,
    at levels of the VP ladder (untrained models: a closed form, no training)."""
    from conftest import TINY
    from mucs.attrib.base import Context
    from mucs.attrib.guda import score_noise
    from mucs.model import build_denoiser
    cfg = compose(TINY + [f"paths.data={data_root}", f"paths.logs={tmp_path}", "model=dit_vp",
                          "sample.discretization=vp", "groups.score.num_noises=8"])
    meta = ensure_dataset("digits", cfg.data.folder)
    tr = load_split(cfg.data.folder, "train").subset(torch.arange(3))
    D = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        D.append(build_denoiser(cfg.model, meta).eval())
    ctx = Context(cfg, D[0], tr, meta, "cpu", tmp_path, tmp_path)
    x, y = tr.float_images(), labels_of(tr, cfg.model, meta)
    G = group_delbo(ctx, lambda k: D[1], 1, x, y)
    sig, E = score_noise(ctx, x.shape[1:])
    assert float(sig[0]) == pytest.approx(D[0].sigma_max, rel=1e-4)  # the top of the VP ladder, sigma(1)

    def eps_error(net):
        s = sig.view(-1, 1, 1, 1)
        with torch.no_grad():
            return torch.stack([((x[i] + s * E - net(x[i] + s * E, sig, y[i].expand(len(sig), -1))) / s - E)
                                .square().flatten(1).mean(1).mean() for i in range(len(x))])

    assert torch.allclose(G[:, 0], eps_error(D[1]) - eps_error(D[0]), rtol=1e-4, atol=1e-5)


def test_retain_draw_excludes_the_group_and_shares_the_rest():
    from mucs.attrib.guda import retain_draw
    from mucs.groups import Groups
    gr = Groups(torch.arange(200) % 10, [str(i) for i in range(10)], torch.arange(200))
    draw = lambda k: retain_draw(gr, k, 64, torch.Generator().manual_seed(5))  # noqa: E731
    r3, r7 = draw(3), draw(7)
    assert torch.equal(r3, draw(3)) and len(set(r3.tolist())) == 64
    assert not (gr.index[r3] == 3).any() and not (gr.index[r7] == 7).any()
    free = (gr.index[r3] != 7) & (gr.index[r7] != 3)  # positions where neither drew the other's group
    assert torch.equal(r3[free], r7[free]) and free.float().mean() > 0.6


def test_common_noise_couples_the_group_runs(job, planted):
    """With alpha 0 (retain fine-tuning only) the unlearned models of two groups differ by SGD noise alone; common
    random numbers must bring them closer together than independent draws, relative to how far they moved."""
    from mucs.attrib.guda import unlearn_group
    from mucs.groups import Groups
    jb = Job(compose(job + ["attrib=guda"] + FAST + ["attrib.alpha=0"]))
    if not jb.weights(jb.pre).exists():
        assert run_pipeline(["--what=tpre"] + job) == 0
    ctx = attrib_context(jb)
    gr = Groups(ctx.train.labels.clone(), [str(i) for i in range(10)], ctx.train.ids.clone())  # 10 label groups
    X, Y = ctx.train.float_images(), labels_of(ctx.train, jb.cfg.model, jb.meta)
    flat = lambda D: torch.cat([p.flatten() for p in D.parameters()])  # noqa: E731
    ratio = {}
    for common in (True, False):
        cfg = OmegaConf.merge(jb.cfg.attrib, dict(common_noise=common))
        a, b = (flat(unlearn_group(ctx, cfg, gr, k, X, Y)[0]) for k in (2, 5))
        ratio[common] = float((a - b).norm() / (a - flat(ctx.D)).norm())
    assert ratio[True] < 0.7 * ratio[False], ratio  # measured 0.43 against 0.84


def test_sweep_label_proxy_matches_the_a_stage(tiny, tmp_path, capsys):
    """scripts/guda_sweep.py's own-class proxy on the targets agrees with the top groups `a` logs for the same
    settings (which reuses the sweep's cached unlearned models); a job whose groups are not its classes is refused."""
    from mucs.generate import load_samples
    fast = FAST + ["attrib.pairs=16", "attrib.batch=16"]
    assert run_pipeline(["--what=tpre,gpre"] + tiny) == 0
    sweep = guard(sweep_main)
    assert sweep(["--variants=attrib.alpha=0;attrib.alpha=1", "--fn_out=sw"] + tiny + fast) == 0
    t = pd.read_csv(tmp_path / "plots" / "sw" / "guda_sweep.csv").set_index("variant")
    assert list(t.index) == ["attrib.alpha=0", "attrib.alpha=1"]
    assert t.own_rank_targets.between(1, 10).all() and t.own_top1_all.between(0, 1).all()
    jb = Job(compose(tiny + ["attrib=guda"] + fast + ["attrib.alpha=1"]))
    n_models = len(list((jb.pre / "guda-cache").glob("*/g*.safetensors")))
    assert run_pipeline(["--what=a", "--attrib=guda"] + tiny + fast + ["attrib.alpha=1"]) == 0
    assert len(list((jb.pre / "guda-cache").glob("*/g*.safetensors"))) == n_models == 20  # reused, not retrained
    log = [json.loads(r) for r in (jb.post / "attrib_log.jsonl").read_text().splitlines()]
    labels = load_samples(jb.pre)["labels"][: len(log)].tolist()
    own = np.mean([r["top_group"] == r["groups"][c] for r, c in zip(log, labels)])
    rank = np.mean([1 + sum(v > r["group_scores"][c] for v in r["group_scores"]) for r, c in zip(log, labels)])
    assert own == pytest.approx(t.loc["attrib.alpha=1", "own_top1_targets"])
    assert rank == pytest.approx(t.loc["attrib.alpha=1", "own_rank_targets"], abs=1e-6), rank
    table = tmp_path / "t.csv"
    table.write_text("id,group\n" + "".join(f"{i},{i % 2}\n" for i in jb.train_split.ids.tolist()))
    capsys.readouterr()
    assert sweep(["--variants=", "groups.source=table", f"groups.table={table}"] + tiny) == 2
    assert "label proxy needs class-conditional samples" in capsys.readouterr().err
