"""diffusers models in the protocol: the adapter against diffusers itself (loss, sampling, saved folders), tiny
models the tests build and save with save_pretrained, and the pipeline with model=diffusers_* and pretrained=."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DModel)
from safetensors.torch import load_file

from mucs import config as C
from mucs.cli import run_eval, run_pipeline
from mucs.diffusers_adapter import DDPMPrecond, DiffusersNet, make_scheduler, scheduler_sampler
from mucs.diffusion import SeedGenerators, heun_sampler, per_sample_loss
from mucs.errors import UserError
from mucs.model import build_denoiser

DIGITS = dict(resolution=8, channels=1, cond="class", num_classes=10, cond_dim=0)
UNET = dict(block_out_channels=[16, 32], layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=8, attention_head_dim=8)
TINY_DDPM = ["train.steps=24", "train.epoch_steps=8", "train.ckpt_every=4", "train.batch=32", "train.warmup_steps=4",
             "num_attrib=3", "control_factor=1.0", "sample.num_steps=4",
             "data.num_removal_base=5", "train.val_items=64", "job_attrib.mucs.num_noises=8",
             "job_attrib.mucs.null_batches=4"]


def tiny_unet(num_class_embeds=None, channels=1, seed=0, **kw):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=kw.pop("out_channels", channels),
                       num_class_embeds=num_class_embeds, **{**UNET, **kw})


def denoiser(model, num_classes=0, **precond):
    return DDPMPrecond(DiffusersNet(model, model.config.in_channels, num_classes), **precond).eval()


@pytest.fixture
def ddpm_run(tmp_path, data_root):
    """Overrides of a seconds-long digits_ddpm job in a fresh run folder."""
    return ["job=digits_ddpm"] + TINY_DDPM + [f"paths.data={data_root}", f"paths.logs={tmp_path / 'logs'}",
                                                 f"paths.plots={tmp_path / 'plots'}", f"paths.cache={tmp_path / 'cache'}"]


# ---------------------------------------------------------------------------------------------
# the parametrisation against diffusers' own scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_per_sample_loss_is_the_schedulers_training_loss(prediction_type, beta_schedule):
    """per_sample_loss at sigma_t equals add_noise at t and the MSE against the scheduler's own target."""
    unet = tiny_unet(num_class_embeds=11)
    kw = dict(beta_schedule=beta_schedule, prediction_type=prediction_type)
    D = denoiser(unet, num_classes=10, **kw)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, **kw)
    g = torch.Generator().manual_seed(0)
    y, eps = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 17, 250, 600, 999])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 9, 2, 5, 7]), 10).float()
    labels[2] = 0  # "no condition": the extra class row
    with torch.no_grad():
        ours = per_sample_loss(D, y, D.sigma_at(t).float(), eps, labels)
        out = unet(sched.add_noise(y, eps, t), t, class_labels=torch.tensor([0, 3, 10, 2, 5, 7])).sample
    target = {"epsilon": eps, "v_prediction": sched.get_velocity(y, eps, t), "sample": y}[prediction_type]
    theirs = (out - target).square().flatten(1).mean(1)
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=1e-6)


def test_timestep_is_exact_at_the_schedules_sigmas_and_interpolates_between():
    D = denoiser(tiny_unet())
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    assert torch.allclose(D.timestep(D.sigma_at(t)), t.double(), atol=1e-6)
    mid = (D.sigma_at(10).log() + D.sigma_at(11).log()) / 2
    assert abs(float(D.timestep(mid.exp().reshape(1))) - 10.5) < 1e-6
    assert float(D.timestep(torch.tensor([1e-9]))) == 0 and float(D.timestep(torch.tensor([1e9]))) == 999
    lo, hi = (float(D.sigma_at(0)), float(D.sigma_at(999)))
    assert (D.sigma_min, D.sigma_max) == (lo, hi) and 0.009 < lo < 0.011 and 150 < hi < 160


def test_training_noise_levels_are_the_schedules_timesteps():
    D = denoiser(tiny_unet())
    s = D.train_sigma(4000, generator=torch.Generator().manual_seed(0))
    t = D.timestep(s)
    assert torch.allclose(t, t.round(), atol=1e-6) and t.min() < 20 and t.max() > 980


def test_ddim_eta0_matches_the_toolkits_euler_sampler():
    """DDIM with eta 0 is Euler on the probability-flow ODE in sigma: from the same noise both give one image."""
    D = denoiser(tiny_unet(num_class_embeds=11), num_classes=10)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True)
    latents = SeedGenerators([3, 4, 5]).randn((1, 8, 8))
    labels = torch.nn.functional.one_hot(torch.tensor([1, 2, 3]), 10).float()
    x_ddim = scheduler_sampler(D, latents, sched, 20, labels)
    sched.set_timesteps(20)
    sigmas = torch.cat([D.sigma_at(sched.timesteps), torch.zeros(1, dtype=torch.float64)])
    # DDIM starts from x_T = noise, the toolkit from sigma_0 * noise in the VE form: the same point up to sqrt(1 + sigma^-2)
    x_euler = heun_sampler(D, latents * (1 + sigmas[0] ** -2).sqrt().float(), sigmas, labels, solver="euler")
    assert (x_ddim - x_euler).abs().max() < 1e-3
    assert (x_ddim - x_euler).abs().max() < 1e-2 * x_ddim.abs().max()


def test_scheduler_sampling_depends_on_each_samples_seed_only():
    """DDPM ancestral steps draw their noise from each sample's own generator: batch layout does not matter."""
    D = denoiser(tiny_unet())
    sched = lambda: make_scheduler(D.config)  # noqa: E731
    gens = SeedGenerators([11, 12, 13])
    together = scheduler_sampler(D, gens.randn((1, 8, 8)), sched(), 10, generators=gens.gens)
    alone = SeedGenerators([12])
    one = scheduler_sampler(D, alone.randn((1, 8, 8)), sched(), 10, generators=alone.gens)
    torch.testing.assert_close(together[1:2], one)
    assert not torch.allclose(together[0], together[1])


def test_dit_labels_null_row_and_no_internal_label_dropout():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    net = DiffusersNet(dit, 1, 10).train()  # train mode: diffusers' DiT would drop labels at random
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5.0, 50.0, 500.0])
    labels = torch.nn.functional.one_hot(torch.tensor([4, 7, 0]), 10).float()
    labels[2] = 0
    out = net(x, t, labels)
    assert out.shape == (3, 1, 8, 8)  # learned-variance outputs cut to the image channels
    ref = dit(x, t, class_labels=torch.tensor([4, 7, 10])).sample[:, :1]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(net(x, t, labels), out)  # no random label dropout


def test_build_checks_the_dataset_and_names_what_is_wrong():
    cfg = C.compose(["job=digits_ddpm"])
    D = build_denoiser(cfg.model, DIGITS)
    assert D.net.model.config.num_class_embeds == 11 and D.net.model.config.sample_size == 8
    with pytest.raises(UserError, match="in_channels is 3 but the dataset needs 1"):
        build_denoiser(C.compose(["job=digits_ddpm", "+model.net_kwargs.in_channels=3"]).model, DIGITS)
    bad = C.compose(["job=digits_ddpm", "+model.net_kwargs.sample_size=16"])
    with pytest.raises(UserError, match="sample_size is 16 but the dataset needs 8"):
        build_denoiser(bad.model, DIGITS)
    with pytest.raises(UserError, match="do not make a UNet2DModel"):
        build_denoiser(C.compose(["job=digits_ddpm", "+model.net_kwargs.bogus=1"]).model, DIGITS)
    with pytest.raises(UserError, match="class labels"):
        build_denoiser(cfg.model, dict(DIGITS, cond="text", cond_dim=8))


def test_cifar_presets_have_the_published_sizes(capsys, tmp_path):
    for job, n in (("cifar10_ddpm", 35.75), ("cifar2_ddpm", 38.31)):
        assert run_pipeline(["--what=tpre,gpre", f"--job={job}", "--no_exec", f"paths.logs={tmp_path}",
                             f"paths.data={tmp_path / 'data'}"]) == 0
        out = capsys.readouterr().out
        assert f"{n:.2f} M parameters at 32x32x3" in out and "diffusers DDPMScheduler 1000 steps" in out
    cfg = C.compose(["job=cifar10_ddpm"])
    D = build_denoiser(cfg.model, dict(DIGITS, resolution=32, channels=3, num_classes=0), device="meta")
    assert abs(sum(p.numel() for p in D.parameters()) / 35.7e6 - 1) < 0.01  # the DDPM paper's CIFAR-10 UNet
    assert (cfg.train.batch, cfg.train.lr, cfg.train.steps, cfg.model.precond.beta_end) == (128, 1e-4, 78125, 0.02)
    assert not any(tmp_path.glob("*/*--pre"))


# ---------------------------------------------------------------------------------------------
# the pipeline on diffusers models, trained here or pretrained


def run_folders(tmp_path, job="digits_ddpm"):
    return sorted((tmp_path / "logs").glob(f"{job}*--pre"))[0]


def test_five_stages_every_method_and_a_loadable_diffusers_folder(ddpm_run, tmp_path, capsys):
    for m, extra in (("random", []), ("pixel", []), ("mucs", ["attrib.max_steps=3"])):
        assert run_pipeline(["--what=tpre,gpre,a,tpost,gpost", f"--attrib={m}"] + extra + ddpm_run) == 0
    for m, extra in (("kernel", []), ("dtrak", ["attrib.proj_dim=64"]), ("guda", ["attrib.epochs=1"])):
        assert run_pipeline(["--what=a", f"--attrib={m}"] + extra + ddpm_run) == 0
    pre = run_folders(tmp_path)
    post = pre.with_name(pre.name.replace("--pre", "--post_mucs"))
    a = load_file(str(post / "attrib.safetensors"))
    assert a["scores"].shape == (3, 1500) and torch.isfinite(a["scores"]).all()
    log = [json.loads(line) for line in (post / "attrib_log.jsonl").read_text().splitlines()]
    assert all(r["steps"] >= 0 and r["stop"] for r in log)
    # the exported folders load in diffusers and give the toolkit's outputs
    cfg = C.load_saved(pre / "config.yaml")
    for folder in (pre, post):
        pipe = DDPMPipeline.from_pretrained(str(folder / "diffusers"), local_files_only=True)
        D = build_denoiser(cfg.model, DIGITS)
        D.load_state_dict(load_file(str(folder / "model-best.safetensors")))
        x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([3.0, 30.0, 300.0, 900.0]), torch.tensor([0, 1, 2, 10])
        with torch.no_grad():
            assert torch.equal(pipe.unet(x, t, class_labels=c).sample, D.eval().net.model(x, t, class_labels=c).sample)
        assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.beta_end == 0.02
    capsys.readouterr()
    job = pre.name.removesuffix("--pre")
    assert run_eval([f"--jobs={job}", "--methods=random,pixel,mucs", f"--logs={tmp_path / 'logs'}",
                     "--metrics=ssim,mse", "--fn_out=t"] + [o for o in ddpm_run if o.startswith("paths.")]) == 0
    assert "mucs" in capsys.readouterr().out
    # LDS on the same run: its subset models are diffusers models too, each exported
    lds = ["lds.num_subsets=2", "lds.num_seeds=1", "lds.steps=8", "lds.num_noises=4", "lds.bootstrap=50"]
    assert run_pipeline(["--what=lds"] + lds + ddpm_run) == 0
    units = sorted((tmp_path / "logs").glob("*--lds-models/m*_s*"))  # the subset models, shared by the job's runs
    assert len(units) == 2 and all((u / "diffusers" / "unet" / "config.json").exists() for u in units)
    assert "mucs" in capsys.readouterr().out


def save_tiny_pipeline(folder, prediction_type="epsilon", num_class_embeds=None):
    """A tiny unconditional DDPM pipeline saved by diffusers, as a user would have one."""
    unet = tiny_unet(num_class_embeds=num_class_embeds, seed=1)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(folder))
    return unet


def test_pretrained_pipeline_runs_the_protocol(ddpm_run, tmp_path, capsys):
    folder = tmp_path / "my-ddpm"
    unet = save_tiny_pipeline(folder, prediction_type="v_prediction")
    pt = [f"pretrained={folder}"]
    for m in ("random", "pixel"):
        assert run_pipeline(["--what=tpre,gpre,a,tpost,gpost", f"--attrib={m}"] + ddpm_run + pt) == 0
    pre = run_folders(tmp_path, "digits_ddpm-my-ddpm")
    # tpre imported the weights (no training) and recorded the file it read
    man = json.loads((pre / "tpre.manifest.json").read_text())
    assert "unet/diffusion_pytorch_model.safetensors" in man["inputs"] and not (pre / "train_log.csv").exists()
    cfg = C.load_saved(pre / "config.yaml")
    assert cfg.model.precond.prediction_type == "v_prediction" and cfg.model.precond.beta_schedule == "squaredcos_cap_v2"
    D = build_denoiser(cfg.model, dict(DIGITS, num_classes=0))
    D.load_state_dict(load_file(str(pre / "model-best.safetensors")))
    for p, q in zip(D.net.model.parameters(), unet.parameters()):
        assert torch.equal(p, q)
    # the pipeline's own scheduler samples it (gpre with sample.sampler=diffusers in a fresh folder of its own)
    assert run_pipeline(["--what=tpre,gpre", "sample.sampler=diffusers", "sample.scheduler=DDIMScheduler", "seed=2"]
                        + ddpm_run + pt) == 0
    s = load_file(str(pre.with_name(pre.name.replace("_s1_", "_s2_")) / "samples.safetensors"))
    assert s["images"].shape == (6, 1, 8, 8) and s["images"].abs().max() <= 1
    # fine-tuning instead of retraining starts from the pretrained weights
    assert run_pipeline(["--what=tpost", "--attrib=pixel", "tpost.mode=finetune", "--force"] + ddpm_run + pt) == 0
    capsys.readouterr()
    job = pre.name.removesuffix("--pre")
    assert run_eval([f"--jobs={job}", "--methods=random,pixel", f"--logs={tmp_path / 'logs'}", "--metrics=mse",
                     "--fn_out=p"] + [o for o in ddpm_run if o.startswith("paths.")]) == 0


def test_finetune_starts_from_the_pre_weights(ddpm_run, tmp_path):
    """With train.steps=0 updates a fine-tune keeps the pre model's weights; a retrain does not."""
    from mucs.train import train
    from mucs.stages import Job
    assert run_pipeline(["--what=tpre"] + ddpm_run) == 0
    job = Job(C.compose(ddpm_run))
    cfg = job.cfg.copy()
    cfg.train.steps, cfg.train.epoch_steps = 1, 1
    cfg.train.lr = 0.0
    for mode, same in (("finetune", True), ("retrain", False)):
        out = tmp_path / mode
        train(cfg, job.train_split, job.test_split, job.meta, out, init=job.weights(job.pre) if same else None)
        a, b = load_file(str(out / "model-last.safetensors")), load_file(str(job.weights(job.pre)))
        assert all(torch.equal(a[k], b[k]) for k in a) == same


@pytest.mark.parametrize("case,match", [
    ("nothing", "is not a folder"),
    ("empty", "is not a diffusers folder"),
    ("noweights", "no weights in"),
    ("rgb", "in_channels is 3 but the dataset needs 1"),
    ("classes", "num_class_embeds is 5 but the dataset needs 11"),
])
def test_pretrained_folder_errors_are_one_line_before_any_work(case, match, ddpm_run, tmp_path, capsys):
    folder = tmp_path / "pt"
    if case == "empty":
        folder.mkdir()
    elif case == "noweights":
        save_tiny_pipeline(folder)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif case in ("rgb", "classes"):
        unet = tiny_unet(channels=3) if case == "rgb" else tiny_unet(num_class_embeds=5)
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(folder))
    capsys.readouterr()
    assert run_pipeline(["--what=tpre,gpre", f"pretrained={folder}"] + ddpm_run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "logs").exists()


def test_diffusers_sampler_needs_a_diffusers_model(tiny, tmp_path, capsys):
    assert run_pipeline(["--what=tpre,gpre", "sample.sampler=diffusers"] + tiny) == 2
    assert "needs a diffusers model" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
