"""The paper-scale job presets: published sizes and recipes, the printed plan, and real training and
generation steps of each preset on tiny datasets that the real preprocessing wrote from archives in
the original release formats (the builders of test_preproc)."""
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mucs import config as C
from mucs import stages as S
from mucs import train as T
from mucs.cli import run_pipeline
from mucs.data import load_split
from mucs.diffusion import SeedGenerators, heun_sampler
from mucs.generate import ladder, load_samples, sample
from mucs.model import build_denoiser
from test_preproc import artbench10, cifar10, coco, coco_files, enc, make_artbench, make_cifar, write_tree

JOBS = ["cifar10_dit_edm", "artbench10_dit_edm", "coco_dit_edm", "cifar10_unet_edm", "cifar10_dit_vp", "cifar10_unet_vp"]

# The published setup (../shared/spec/datasets_models.md): parameters, recipe, sampler, removal base.
PUBLISHED = {
    #                   params  net     precond batch  lr    ema     aug   epochs steps disc  cfg  base  cond
    "cifar10_dit_edm": (100e6, "dit", "edm", 128, 1e-4, 0.999, 0.12, 200, 32, "edm", 1.0, 500, False),
    "artbench10_dit_edm": (100e6, "dit", "edm", 128, 2e-4, 0.999, 0.12, 250, 32, "edm", 2.0, 499, True),
    "coco_dit_edm": (147e6, "dit", "edm", 128, 2e-4, 0.999, 0.12, 300, 32, "edm", 3.0, 1183, True),
    "cifar10_unet_edm": (56e6, "unet", "edm", 256, 1e-4, 0.9996, 0.1, 200, 32, "edm", 1.0, 500, False),
    "cifar10_dit_vp": (100e6, "dit", "vp", 256, 1e-4, 0.9996, 0.1, 200, 128, "vp", 1.0, 500, False),
    "cifar10_unet_vp": (125e6, "unet", "vp", 128, 1e-4, 0.999, 0.1, 200, 128, "vp", 1.0, 500, False),
}
# What the preprocessing writes for the full datasets (the tiny copies below differ in size only).
REAL_META = {"cifar10": dict(resolution=32, channels=3, cond="class", num_classes=10, cond_dim=0),
             "artbench10": dict(resolution=64, channels=3, cond="class", num_classes=10, cond_dim=0),
             "coco": dict(resolution=64, channels=3, cond="text", num_classes=0, cond_dim=768)}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("job", JOBS)
def test_published_size(job):
    cfg = C.compose([f"job={job}"])
    D = build_denoiser(cfg.model, REAL_META[cfg.data.name], device="meta")  # shapes only, no memory
    n, want = n_params(D), PUBLISHED[job][0]
    assert abs(n / want - 1) < 0.05, f"{job}: {n / 1e6:.2f} M parameters, published about {want / 1e6:.0f} M"
    assert D.net.map_augment.in_features == 9  # the augmentation label is an input
    label = {"artbench10": 10, "coco": 768}.get(cfg.data.name)
    assert (D.net.map_label is None) == (label is None)
    if label:
        first = D.net.map_label[0] if cfg.model.net == "dit" else D.net.map_label
        assert first.in_features == label
    if job == "coco_dit_edm":
        assert D.net.map_label[-1].out_features == 1024  # condition width 1024
    if job == "cifar10_dit_vp":
        assert D.net.extra_tokens is None


@pytest.mark.parametrize("job", JOBS)
def test_published_recipe(job):
    cfg = C.compose([f"job={job}"])
    _, net, precond, batch, lr, ema, aug, epochs, steps, disc, guidance, base, cond = PUBLISHED[job]
    t, s = cfg.train, cfg.sample
    assert (cfg.model.net, cfg.model.precond.kind, cfg.model.conditional) == (net, precond, cond)
    assert (t.batch, t.lr, t.ema, t.augment_p, t.weight_decay) == (batch, lr, ema, aug, 0.01)
    assert (t.epoch_steps, t.steps, t.patience, t.cond_dropout) == (1000, epochs * 1000, 20, 0.1)
    assert (s.num_steps, s.discretization, s.guidance, s.solver, s.S_churn) == (steps, disc, guidance, "heun", 0.0)
    assert (s.sigma_min, s.sigma_max, s.rho) == (0.002, 80.0, 7.0)
    assert cfg.data.num_removal_base == base and C.num_removal(cfg) == 2 * base
    assert T.make_augment(cfg.model, cfg.train) is not None
    k = cfg.model.net_kwargs
    if net == "dit":
        assert (k.patch, k.width, k.depth, k.heads, k.mlp_ratio, k.dropout) == (2, 768, 12, 12, 4.0, 0.1)
        assert (k.cond_width, k.extra_tokens) == (1024 if job.startswith("coco") else 256, 0 if precond == "vp" else 32)
    else:
        assert (k.model_channels, list(k.channel_mult), k.num_blocks, list(k.attn_resolutions), k.dropout) == (
            192 if precond == "vp" else 128, [2, 2, 2], 4, [16], 0.1)
    if precond == "vp":
        assert dict(cfg.model.precond) == dict(kind="vp", beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    else:
        assert (cfg.model.precond.sigma_data, cfg.model.precond.P_mean, cfg.model.precond.P_std) == (0.5, -1.2, 1.2)


def test_no_exec_prints_the_published_plan(tmp_path, capsys):
    assert run_pipeline(["--what=tpre", "--job=cifar10_dit_edm", "--no_exec", f"paths.logs={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for words in ["plan for job cifar10_dit_edm", "model dit", "'width': 768", "'depth': 12", "'extra_tokens': 32",
                  "precond edm", "train batch 128 lr 0.0001 ema 0.999 steps <= 200000", "num_removal 1000 per target",
                  "epoch 1000 updates (<= 200 epochs), patience 20, augment p 0.12 (label 9-d), unconditional",
                  "heun 32 steps, edm ladder, guidance 1.0", "] tpre", "cifar10_dit_edm_s1_k2.0_na20_sb0--pre/model-best"]:
        assert words in out, words
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# A few real steps of every preset on tiny preprocessed datasets


def build_tiny_datasets(root):
    """cifar10 (30 train / 10 test), artbench10 (5 / 3, three styles) and coco (3 / 2, 8-d caption
    embeddings) in the stored format, by the real preprocessing scripts."""
    make_cifar(root / "src" / "cifar10", per_batch=6, n_test=10)
    assert cifar10.main(["--source_dir", str(root / "src" / "cifar10"), "--out", str(root / "cifar10")]) == 0
    make_artbench(root / "src" / "artbench10")
    assert artbench10.main(["--source_dir", str(root / "src" / "artbench10"), "--out", str(root / "artbench10"),
                            "--workers", "1"]) == 0
    write_tree(root / "src" / "coco", coco_files(), lambda r: True)
    assert coco.main(["--source_dir", str(root / "src" / "coco"), "--out", str(root / "coco")], text_encoder=enc) == 0
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_datasets(tmp_path_factory.mktemp("archives"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread (and do not fight other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Shrink width, depth, length and batch; the network type, preconditioning, augmentation and
# conditioning stay the preset's.
SHRINK = {"dit": ["model.net_kwargs.width=32", "model.net_kwargs.depth=1", "model.net_kwargs.heads=2",
                  "model.net_kwargs.cond_width=32", "model.net_kwargs.front_channels=8"],
          "unet": ["model.net_kwargs.model_channels=16", "model.net_kwargs.channel_mult=[1,1]",
                   "model.net_kwargs.num_blocks=1"]}
SHORT = ["train.steps=2", "train.epoch_steps=2", "train.batch=4", "train.warmup_steps=1", "train.val_items=4",
         "sample.batch=8"]


def tiny_overrides(job, data, logs):
    net = PUBLISHED[job][1]
    gen = ["num_attrib=2", "control_factor=1.0"] if job.startswith("cifar10") else ["num_attrib=1", "control_factor=0.0"]
    return [f"--job={job}", f"paths.data={data}", f"paths.logs={logs}", "device=cpu", "data.num_removal_base=1"] + \
        SHRINK[net] + SHORT + gen  # a removal that fits the tiny archives' training splits (every job setting is checked)


@pytest.mark.parametrize("job", JOBS)
def test_preset_trains_and_generates_on_tiny_archives(job, tiny_data, tmp_path, monkeypatch):
    seen = []

    def spy(D, y, sigma, eps, labels=None, augment_labels=None):
        seen.append((None if labels is None else tuple(labels.shape),
                     None if augment_labels is None else tuple(augment_labels.shape)))
        return per_sample_loss(D, y, sigma, eps, labels, augment_labels)

    per_sample_loss = T.per_sample_loss
    monkeypatch.setattr(T, "per_sample_loss", spy)
    over = tiny_overrides(job, tiny_data, tmp_path / "logs")
    assert run_pipeline(["--what=tpre,gpre"] + over) == 0
    cfg = C.compose([o.lstrip("-") for o in over])
    job_ = S.Job(cfg)
    meta, test = job_.meta, job_.test_split
    label = {"cifar10": None, "artbench10": 3, "coco": 8}[cfg.data.name]  # the tiny sets' styles / embedding width

    # the two training batches carried the augmentation label and the preset's condition (then validation)
    assert len(seen) == 3 and seen[2][1] is None
    assert all(aug == (4, 9) for _, aug in seen[:2])
    assert all(lab == (None if label is None else (4, label)) for lab, _ in seen[:2])
    saved = OmegaConf.load(job_.pre / "config.yaml")
    assert (saved.model.net, saved.model.precond.kind, saved.train.augment_p, saved.model.conditional) == (
        PUBLISHED[job][1], PUBLISHED[job][2], PUBLISHED[job][6], PUBLISHED[job][12])
    log = (job_.pre / "train_log.csv").read_text().splitlines()
    assert len(log) == 2 and all(math.isfinite(float(v)) for v in log[1].split(","))

    # gpre: finite images of the dataset's shape, seeded and conditioned by held-out items
    s = load_samples(job_.pre)
    n = C.num_gen(cfg)
    assert s["images"].shape == (n, 3, meta["resolution"], meta["resolution"])
    assert torch.isfinite(s["images"]).all() and s["images"].abs().max() <= 1
    by_id = {int(i): k for k, i in enumerate(test.ids)}
    rows = [by_id[int(i)] for i in s["seeds"]]
    if cfg.data.name == "coco":  # the first caption's embedding of each seed item
        torch.testing.assert_close(s["cond"], test.conds[rows, 0])
    elif label:
        assert torch.equal(s["cond"].argmax(1), test.labels[rows])
    else:
        assert "cond" not in s

    D = job_.denoiser(job_.pre)
    sig = ladder(cfg, D)
    assert len(sig) == cfg.sample.num_steps + 1 and sig[-1] == 0
    if PUBLISHED[job][2] == "vp":  # t from 1 to 1e-3 through the model's sigma(t)
        assert abs(sig[0] - D.sigma(1.0)) < 1e-9 and abs(sig[-2] - D.sigma(1e-3)) < 1e-9
        assert 152.1 < sig[0] < 152.2 and 0.0104 < sig[-2] < 0.0106
        gens = SeedGenerators(s["seeds"].tolist())  # gpre's images, before clamping: finite
        x = heun_sampler(D, gens.randn(tuple(s["images"].shape[1:])), sig)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x.clamp(-1, 1), s["images"], atol=1e-5, rtol=0)
    else:
        assert abs(sig[0] - 80) < 1e-9 and abs(sig[-2] - 0.002) < 1e-9
    if cfg.sample.guidance != 1.0:  # classifier-free guidance is applied: a plain conditional sample differs
        cond = s["cond"]
        again = sample(D, cfg, s["seeds"].tolist(), cond, tuple(s["images"].shape[1:]), "cpu")
        assert torch.equal(again, s["images"])
        plain = OmegaConf.merge(cfg, {"sample": {"guidance": 1.0}})
        assert not torch.equal(sample(D, plain, s["seeds"].tolist(), cond, tuple(s["images"].shape[1:]), "cpu"),
                               s["images"])


def test_vp_sampling_needs_a_vp_model(tiny_data, tmp_path, capsys):
    over = tiny_overrides("cifar10_dit_edm", tiny_data, tmp_path / "logs")
    assert run_pipeline(["--what=tpre"] + over) == 0
    capsys.readouterr()
    assert run_pipeline(["--what=gpre", "sample.discretization=vp"] + over) == 2
    err = capsys.readouterr().err
    assert "discretization=vp" in err and "'edm'" in err and len(err.strip().splitlines()) == 1


def test_sampling_autocast_bf16_stays_close(tiny_data, tmp_path):
    """precision.autocast=bf16 reaches the sampler (the images change) and stays near the float32 ones."""
    over = tiny_overrides("cifar10_unet_edm", tiny_data, tmp_path / "logs")
    assert run_pipeline(["--what=tpre"] + over) == 0
    cfg = C.compose([o.lstrip("-") for o in over] + ["sample.num_steps=8"])
    job = S.Job(cfg)
    D = job.denoiser(job.pre)
    seeds, shape = [3, 4], (3, 32, 32)
    x32 = sample(D, cfg, seeds, None, shape, "cpu")
    x16 = sample(D, OmegaConf.merge(cfg, {"precision": {"autocast": "bf16"}}), seeds, None, shape, "cpu")
    assert not torch.equal(x32, x16)
    assert (x32 - x16).abs().mean() < 0.05, (x32 - x16).abs().mean()
