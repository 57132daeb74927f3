"""Caches and resumable parts never mix numerics: each per-job cache is keyed by the numerics it was computed
under (device type, dtype, mixed precision, TF32), its noise set and the model; a part written under other
numerics (an attribution target, an LDS unit, a generation batch, a training state) is recomputed or refused,
never combined. Scores run without TF32 by default (precision.score_tf32), and the `a` stage's settings include
the precision. Other devices are simulated by what a file records (or by what the key function reports)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from mucs import attrib
from mucs.attrib.mucs import MUCS
from mucs.cli import run_pipeline
from mucs.config import compose
from mucs.errors import UserError
from mucs.io import load_tensor_metadata, save_tensors
from mucs.precision import tf32
from mucs.stages import Job, attrib_context

RUN = "digits_dit_edm_s1_k2.0_na3_sb0"
FAST_MUCS = ["attrib=mucs", "attrib.num_noises=8", "attrib.null_batches=2", "attrib.max_steps=2"]


@pytest.fixture(scope="module")
def base(data_root, tmp_path_factory):
    """tpre and gpre of the tiny job, copied afresh by each test."""
    logs = tmp_path_factory.mktemp("numerics") / "logs"
    assert run_pipeline(["--what=tpre,gpre"] + over(data_root, logs)) == 0
    return logs


def over(data_root, logs, *extra):
    return TINY + [f"paths.data={data_root}", f"paths.logs={logs}", f"paths.plots={logs.parent / 'plots'}",
                   f"paths.cache={logs.parent / 'cache'}", *extra]


@pytest.fixture
def logs(base, tmp_path):
    shutil.copytree(base, tmp_path / "logs")
    return tmp_path / "logs"


def pretend(path, change, **numerics):
    """Rewrite a safetensors file as if computed under other numerics: its tensors changed by `change` (as other
    numerics would) and its recorded numerics updated."""
    meta = load_tensor_metadata(path)
    meta["numerics"] = dict(meta["numerics"], **numerics)
    save_tensors(path, {k: change(v) for k, v in load_file(str(path)).items()}, meta)


# ---------------------------------------------------------------------------------------------
# Per-job caches


def test_cached_L_orig_is_keyed_by_numerics_noise_and_model(logs, data_root, monkeypatch, capsys):
    cfg = over(data_root, logs, *FAST_MUCS)

    def prepare(*extra):
        capsys.readouterr()
        job = Job(compose(cfg + list(extra)))
        m = MUCS(job.cfg.attrib, attrib_context(job))
        m.prepare()
        return m, capsys.readouterr().out.count("computing mucs-L_orig")

    files = lambda: sorted((logs / f"{RUN}--pre" / "attrib-cache").glob("mucs-L_orig-*"))  # noqa: E731
    m, computed = prepare()
    assert computed == 1 and len(files()) == 1
    key = load_tensor_metadata(files()[0])["key"]
    assert key["numerics"] == dict(device="cpu", dtype="float32", autocast="none", tf32=False)
    assert {"noise", "weights", "data", "eval"} <= set(key)
    again, computed = prepare()  # the same numerics: read, not computed
    assert computed == 0 and torch.equal(again.L_orig, m.L_orig)
    with tf32(True):  # what a CUDA run with TF32 on computes under
        assert prepare()[1] == 1
    real = attrib.base.numerics
    monkeypatch.setattr(attrib.base, "numerics", lambda *a: dict(real(*a), device="cuda"))
    assert prepare()[1] == 1  # another device type
    monkeypatch.setattr(attrib.base, "numerics", lambda *a: dict(real(*a), dtype="bfloat16"))
    assert prepare()[1] == 1
    monkeypatch.setattr(attrib.base, "numerics", real)
    assert prepare("attrib.noise_seed=3")[1] == 1  # another noise set
    weights = logs / f"{RUN}--pre" / "model-best.safetensors"
    t = load_file(str(weights))
    name = next(iter(t))
    save_tensors(weights, dict(t, **{name: t[name] + 1e-3}), load_tensor_metadata(weights))  # another pre model
    assert prepare()[1] == 1
    assert len(files()) == 6


def test_guda_models_are_keyed_by_numerics(logs, data_root):
    from mucs.attrib.guda import cache_dir
    from mucs.groups import load_groups
    job = Job(compose(over(data_root, logs, "attrib=guda")))
    ctx = attrib_context(job)
    groups = load_groups(job.cfg.groups, ctx.train, ctx.meta)
    plain = cache_dir(ctx, job.cfg.attrib, groups)
    with tf32(True):
        assert cache_dir(ctx, job.cfg.attrib, groups) != plain
    assert cache_dir(ctx, job.cfg.attrib, groups) == plain


# ---------------------------------------------------------------------------------------------
# Resumable parts


def test_attribution_part_of_other_numerics_is_scored_again(logs, data_root, capsys):
    cfg = over(data_root, logs, "--attrib=pixel")
    assert run_pipeline(["--what=a"] + cfg) == 0
    post = logs / f"{RUN}--post_pixel"
    clean = load_file(str(post / "attrib.safetensors"))
    for f in ("attrib.safetensors", "a.manifest.json"):  # killed before the merge finished
        (post / f).unlink()
    pretend(post / "attrib-parts" / "t00001.safetensors", lambda v: v * 2, device="cuda", tf32=True)
    # the merge step alone refuses to combine them
    capsys.readouterr()
    assert run_pipeline(["--what=a", "--shard=-1/2"] + cfg) == 2
    err = capsys.readouterr().err
    assert "targets [1]" in err and "device: cpu -> cuda" in err and "not combined" in err
    # a run that scores recomputes the part made under other numerics, and gives the uninterrupted bytes
    assert run_pipeline(["--what=a"] + cfg) == 0
    assert "targets [1] were scored under other numerics (device: cuda -> cpu; tf32: True -> False)" in \
        capsys.readouterr().out
    now = load_file(str(post / "attrib.safetensors"))
    assert all(torch.equal(now[k], clean[k]) for k in clean)


def test_lds_unit_of_other_numerics_is_measured_again(logs, data_root, capsys):
    cfg = over(data_root, logs, "lds.num_subsets=2", "lds.num_seeds=1", "lds.steps=8", "lds.num_noises=4")
    assert run_pipeline(["--what=lds"] + cfg) == 0
    d, m0 = logs / f"{RUN}--lds", logs / "digits_dit_edm_s1_sb0--lds-models" / "m0_s0"
    clean = load_file(str(d / "lds-outputs.safetensors"))["f"]
    weights = (m0 / "model-best.safetensors").stat().st_mtime_ns
    [unit] = m0.glob("lds-output-*.safetensors")  # the one query set's measurement
    pretend(unit, lambda v: v * 2, device="cuda")
    capsys.readouterr()
    assert run_pipeline(["--what=lds", "--shard=-1/2"] + cfg) == 0  # done: the merge is not redone
    assert run_pipeline(["--what=lds", "--force", "--shard=-1/2"] + cfg) == 2
    assert "measured under other numerics (device: cuda -> cpu)" in capsys.readouterr().err
    assert run_pipeline(["--what=lds", "--shard=0/2"] + cfg) == 0  # measures m0 again, without retraining it
    assert (m0 / "model-best.safetensors").stat().st_mtime_ns == weights
    assert run_pipeline(["--what=lds", "--shard=-1/2"] + cfg) == 0
    assert torch.equal(load_file(str(d / "lds-outputs.safetensors"))["f"], clean)


def test_generation_batch_of_other_numerics_is_made_again(logs, data_root, tmp_path):
    from mucs.generate import sample
    job = Job(compose(over(data_root, logs, "sample.batch=2")))
    D, seeds = job.denoiser(job.pre), [3, 5, 7]
    first = sample(D, job.cfg, seeds, None, (1, 8, 8), "cpu", parts=tmp_path / "parts")
    pretend(tmp_path / "parts" / "b00000.safetensors", lambda v: v * 0 if v.is_floating_point() else v, device="cuda")
    again = sample(D, job.cfg, seeds, None, (1, 8, 8), "cpu", parts=tmp_path / "parts")
    assert torch.equal(again, first) and first[:2].abs().sum() > 0
    assert load_tensor_metadata(tmp_path / "parts" / "b00000.safetensors")["numerics"]["device"] == "cpu"


def test_training_state_of_other_numerics_is_refused(logs, data_root, tmp_path, monkeypatch):
    from mucs import train as T
    job = Job(compose(over(data_root, logs)))
    shutil.copy(job.pre / "train-state.pt", tmp_path / "train-state.pt")
    args = (job.cfg, job.train_split, job.test_split, job.meta, tmp_path, "cpu")
    assert T.train(*args)["stopped"]  # the same numerics: found finished
    real = T.numerics
    monkeypatch.setattr(T, "numerics", lambda *a: dict(real(*a), device="cuda"))
    with pytest.raises(UserError, match="another training run .*numerics"):
        T.train(*args)


# ---------------------------------------------------------------------------------------------
# TF32 and the settings of `a`


def test_scores_run_without_tf32_unless_asked_and_a_records_it(logs, data_root, monkeypatch, capsys):
    seen = []
    Pixel = attrib.get_method("pixel")
    score = Pixel.score
    monkeypatch.setattr(Pixel, "score", lambda self, *a: (seen.append(torch.backends.cuda.matmul.allow_tf32),
                                                          score(self, *a))[1])
    with tf32(True):  # as training on a GPU leaves it
        assert run_pipeline(["--what=a", "--attrib=pixel"] + over(data_root, logs)) == 0
        assert seen == [False]
        settings = json.loads((logs / f"{RUN}--post_pixel" / "a.manifest.json").read_text())["settings"]
        assert "precision" not in settings  # the default is left out: manifests written before stay valid
        capsys.readouterr()
        assert run_pipeline(["--what=a", "--attrib=pixel", "precision.score_tf32=true"] + over(data_root, logs)) == 2
        assert "precision.score_tf32: (unset) -> True" in capsys.readouterr().err  # (unset): the default
        assert run_pipeline(["--what=a", "--attrib=pixel", "--force", "precision.score_tf32=true"]
                            + over(data_root, logs)) == 0
        assert seen == [False, True]
    settings = json.loads((logs / f"{RUN}--post_pixel" / "a.manifest.json").read_text())["settings"]
    assert settings["precision"] == {"score_tf32": True}
    assert not torch.backends.cuda.matmul.allow_tf32  # restored after the stage


@pytest.mark.gpu
def test_tf32_on_for_training_off_for_scores_on_cuda(tiny):
    from mucs.precision import scoring
    job = Job(compose(tiny + ["device=cuda"]))
    assert torch.backends.cuda.matmul.allow_tf32  # precision.tf32: training and sampling
    with scoring(job.cfg):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
