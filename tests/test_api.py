"""The Python API: the same scores as the CLI bit for bit, data in memory, diffusers folders, the counterfactual,
evaluation and report as functions, and bad input as mucs.UserError with the CLI's messages."""
import pandas as pd
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

import mucs
from conftest import TINY
from mucs.cli import run_pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A tiny digits run with gpre done (one for the module): its pre folder, dataset folder and overrides."""
    logs = tmp_path_factory.mktemp("api")
    over = TINY + [f"paths.data={data_root}", f"paths.logs={logs}", f"paths.plots={logs}/plots",
                   f"paths.cache={logs}/cache"]
    assert run_pipeline(["--what=tpre,gpre"] + over) == 0
    return logs / "digits_dit_edm_s1_k2.0_na3_sb0--pre", f"{data_root}/digits", over


def test_attribute_equals_the_cli_bit_for_bit(run):
    pre, data, tiny = run
    d = mucs.load(pre, device="cpu")
    s = load_file(str(pre / "samples.safetensors"))
    for m, kw in (("pixel", {}), ("kernel", {}), ("mucs", dict(max_steps=3))):
        assert run_pipeline(["--what=a", f"--attrib={m}"] + [f"attrib.{k}={v}" for k, v in kw.items()] + tiny) == 0
        out = mucs.attribute(d, data, s["images"][:3], m, target_labels=s["cond"][:3], **kw)
        ref = load_file(str(pre.with_name(pre.name.replace("--pre", f"--post_{m}")) / "attrib.safetensors"))
        assert torch.equal(out.scores, ref["scores"]) and torch.equal(out.top(10), ref["top_ids"]), m
        assert torch.equal(out.train_ids, ref["train_ids"])


def test_training_data_in_memory_and_png_targets(run, tmp_path):
    """Images in [-1, 1] with their own ids: a planted copy of the target ranks first, whatever its id."""
    from PIL import Image
    pre, data, _ = run
    d = mucs.load(pre, device="cpu")
    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 1, 8, 8, generator=g) * 2 - 1
    target = train[17:18].clone()
    ids = torch.arange(1000, 1050)
    s = mucs.attribute(d, train, target, "pixel", train_ids=ids, train_labels=torch.zeros(50, dtype=torch.long))
    assert s.scores.shape == (1, 50) and int(s.top(1)[0, 0]) == 1017
    # PNG paths as targets (as stored: uint8 grey)
    png = tmp_path / "t.png"
    Image.fromarray(((target[0, 0] + 1) * 127.5).round().byte().numpy()).save(png)
    s2 = mucs.attribute(d, train, [png], "pixel", train_ids=ids)
    assert int(s2.top(1)[0, 0]) == 1017


def test_a_diffusers_folder_loads_and_attributes(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "pipe"))
    d = mucs.load(tmp_path / "pipe", device="cpu")
    assert d.meta["resolution"] == 8 and d.meta["num_classes"] == 0 and d.cfg.model.net == "diffusers_unet"
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 5.0])
    with torch.no_grad():
        ref = x - sigma[:, None, None, None] * unet(x / (1 + sigma[:, None, None, None] ** 2).sqrt(),
                                                    d.D.timestep(sigma).float()).sample
        torch.testing.assert_close(d(x, sigma), ref)
    train = torch.rand(20, 1, 8, 8) * 2 - 1
    s = mucs.attribute(d, train, train[:2], "mucs", num_noises=4, null_batches=2, max_steps=2, num_removal=5)
    assert s.scores.shape == (2, 20) and torch.isfinite(s.scores).all() and s.top(5).shape == (2, 5)


@pytest.mark.parametrize("call,match", [
    (lambda d, data, x: mucs.attribute(d, data, x[:, :, :4], "pixel"), r"shape \(2, 1, 4, 8\), the model needs"),
    (lambda d, data, x: mucs.attribute(d, data, x * 3, "pixel"), r"values in .*scale them to \[-1, 1\]"),
    (lambda d, data, x: mucs.attribute(d, data, x, "nope"), "unknown attribution method 'nope'"),
    (lambda d, data, x: mucs.attribute(d, data, x, "mucs", bogus=1), "unknown key 'bogus' for method mucs"),
    (lambda d, data, x: mucs.attribute(d, data, x, "mucs", num_noises="many"), "expected a number"),
    (lambda d, data, x: mucs.attribute(d, torch.zeros(5, 3, 16, 16), x, "pixel"), r"train images have shape"),
    (lambda d, data, x: mucs.attribute(d, torch.zeros(5, 1, 8, 8), x, "pixel", train_ids=[1, 1, 2, 3, 4]),
     "one unique id"),
    (lambda d, data, x: mucs.attribute(d.D, data, x, "pixel"), "must be a mucs.Denoiser"),
    (lambda d, data, x: mucs.load(data + "/nowhere"), "is not a folder"),
])
def test_bad_input_is_one_user_error(run, call, match):
    pre, data, _ = run
    d = mucs.load(pre, device="cpu")
    x = torch.full((2, 1, 8, 8), 0.5)
    with pytest.raises(mucs.UserError, match=match) as e:
        call(d, data, x)
    assert "\n" not in str(e.value)


def test_counterfactual_evaluate_and_report(tiny, tmp_path):
    over = [o for o in tiny if not o.startswith("num_attrib")] + ["num_attrib=3"]
    table = mucs.counterfactual("digits_dit_edm", "pixel", seeds=[1], overrides=over, metrics="ssim,mse")
    assert isinstance(table, pd.DataFrame) and set(table.method) == {"random", "pixel"}
    assert table.auc_target.between(0, 1).all() and set(table.metric) == {"ssim", "mse"}
    # the same evaluation through evaluate(), into a folder of our choosing, then the report
    t2 = mucs.evaluate(["digits_dit_edm_s1_*"], ["pixel"], metrics="ssim,mse", out=tmp_path / "ev", overrides=over)
    pd.testing.assert_frame_equal(t2.reset_index(drop=True), table.reset_index(drop=True), check_like=True)
    page = mucs.report(tmp_path / "ev", overrides=over)
    assert page.exists() and "pixel" in page.read_text()
