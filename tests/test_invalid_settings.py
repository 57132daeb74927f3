"""Every invalid setting is refused before any work, by every entry point: exit code 2, one line that names the key
and its value and says what is allowed, and not one new file or folder anywhere (run folders, plots, cache, data,
the repository's pointer_to). A Slurm submission submits nothing.

The cases run on a fresh paths root whose run folders do not exist yet: before the check existed, `--subsample=-5`
trained a model into a new run folder `..._sb-5--pre`, and `--topk_factor=-1` or `--num_attrib=0` were refused
only because their run folder had no model yet."""
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mucs import cli
from mucs import launch as L

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    id: str
    tool: str  # pipeline, slurm, eval, grid, guda_eval, guda_sweep, status, removal, bench
    args: list
    words: tuple  # all in the error line: the key and value, and the allowed range or the fix
    sub: bool = False  # the real command line in a subprocess


def P(id, args, *words, tool="pipeline", sub=False):
    return Case(id, tool, list(args), words, sub)


CASES = [
    # counts, sizes and factors
    P("subsample_negative", ["--subsample=-5"], "subsample=-5", ">= 0", sub=True),
    P("subsample_above_training_set", ["--subsample=2000"], "subsample=2000", "[0, 1500]"),
    P("topk_factor_negative", ["--topk_factor=-1"], "topk_factor=-1.0", "> 0"),
    P("topk_factor_zero", ["--topk_factor=0"], "topk_factor=0.0", "> 0"),
    P("topk_factor_removes_everything", ["--topk_factor=100"], "num_removal 1500", "[1, 1499]", "--topk_factor"),
    P("num_attrib_zero", ["--num_attrib=0"], "num_attrib=0", ">= 1"),
    P("num_attrib_beyond_test_split", ["--num_attrib=200"], "num_attrib=200", "400 samples", "297 items"),
    P("control_factor_negative", ["--control_factor=-0.5"], "control_factor=-0.5", ">= 0"),
    P("num_removal_zero", ["num_removal=0"], "num_removal=0", ">= 1"),
    P("num_removal_whole_training_set", ["num_removal=1500"], "num_removal 1500", "[1, 1499]"),
    P("seed_negative", ["--seed=-1"], "seed=-1", ">= 0"),
    P("lock_wait_negative", ["lock_wait=-1"], "lock_wait=-1", ">= 0"),
    P("removal_base_zero", ["data.num_removal_base=0"], "data.num_removal_base=0", "> 0"),
    # training
    P("train_steps_zero", ["train.steps=0"], "train.steps=0", ">= 1"),
    P("train_batch_zero", ["train.batch=0"], "train.batch=0", ">= 1"),
    P("train_lr_zero", ["train.lr=0"], "train.lr=0", "> 0"),
    P("train_ema_one", ["train.ema=1.0"], "train.ema=1.0", "< 1"),
    P("train_epoch_steps_zero", ["train.epoch_steps=0"], "train.epoch_steps=0", ">= 1"),
    P("cond_dropout_above_one", ["train.cond_dropout=1.5"], "train.cond_dropout=1.5", "<= 1"),
    P("augment_p_negative", ["train.augment_p=-0.1"], "train.augment_p=-0.1", ">= 0"),
    # sampling
    P("sample_steps_one", ["sample.num_steps=1"], "sample.num_steps=1", ">= 2"),
    P("sample_batch_zero", ["sample.batch=0"], "sample.batch=0", ">= 1"),
    P("sigma_min_zero", ["sample.sigma_min=0"], "sample.sigma_min=0", "> 0"),
    P("sigma_min_above_sigma_max", ["sample.sigma_min=100"], "sample.sigma_max=80.0", "sample.sigma_min=100"),
    P("surplus_below_one", ["sample.surplus=0.5"], "sample.surplus=0.5", ">= 1"),
    P("unknown_discretization", ["sample.discretization=linear"], "sample.discretization='linear'", "edm, vp"),
    P("unknown_solver", ["sample.solver=rk4"], "sample.solver='rk4'", "heun, euler"),
    P("unknown_sampler", ["sample.sampler=ddim"], "sample.sampler='ddim'", "heun, diffusers"),
    # precision, device, modes, paths
    P("unknown_autocast", ["precision.autocast=fp8"], "precision.autocast='fp8'", "none, bf16, fp16"),
    P("unknown_tpost_mode", ["tpost.mode=partial"], "tpost.mode='partial'", "retrain, finetune"),
    P("unknown_device", ["--device=gpu"], "device='gpu'", "cuda:N"),
    P("targets_missing", ["targets=/nonexistent/targets"], "targets='/nonexistent/targets'", "existing file or folder"),
    P("unknown_group_source", ["groups.source=style"], "groups.source='style'", "label, table"),
    P("group_table_missing", ["groups.source=table", "groups.table=/nonexistent.csv"],
      "group table /nonexistent.csv does not exist"),
    P("groups_score_noises_zero", ["groups.score.num_noises=0"], "groups.score.num_noises=0", ">= 1"),
    # LDS
    P("lds_alpha_one", ["--what=lds", "lds.alpha=1.0"], "lds.alpha=1.0", "> 0 and < 1"),
    P("lds_one_subset", ["--what=lds", "lds.num_subsets=1"], "lds.num_subsets=1", ">= 2"),
    P("lds_t_range_reversed", ["--what=lds", "lds.t_range=[0.8,0.2]"], "lds.t_range=[0.8, 0.2]", "lo <= hi"),
    # the known-answer benchmark
    P("known_jpeg_quality_zero", ["--what=known", "known.copies.jpeg=[0]"], "known.copies.jpeg=[0]", "<= 100"),
    P("known_noise_negative", ["--what=known", "known.copies.noise=[-0.1]"], "known.copies.noise=[-0.1]", "> 0"),
    P("known_unknown_method", ["--what=known", "known.methods=[nope]"], "known.methods=['nope']", "pixel"),
    P("known_share_one", ["--what=known", "known.custom.share=1"], "known.custom.share=1", "< 1"),
    P("known_items_beyond_training_split", ["--what=known", "known.copies.num_items=2000"],
      "known.copies.num_items=2000", "1500"),
    P("known_exemplars_beyond_test_split", ["--what=known", "known.custom.num_exemplars=300"],
      "known.custom.num_exemplars=300", "297"),
    P("known_nothing_to_measure", ["--what=known", "known.copies.num_items=0", "known.custom.num_exemplars=0"],
      "nothing to measure"),
    # methods
    P("mucs_lambda_negative", ["--attrib=mucs", "attrib.lam=-0.1"], "attrib.lam=-0.1", ">= 0"),
    P("mucs_noises_zero", ["--attrib=mucs", "attrib.num_noises=0"], "attrib.num_noises=0", ">= 1"),
    P("mucs_t_sched_zero", ["--attrib=mucs", "attrib.t_sched_infer=0"], "attrib.t_sched_infer=0", "> 0 and <= 1"),
    P("mucs_unknown_score", ["--attrib=mucs", "attrib.score=ratios"], "attrib.score='ratios'", "ratio, diff"),
    P("mucs_tolerance_one", ["--attrib=mucs", "attrib.tolerance=1.5"], "attrib.tolerance=1.5", "< 1"),
    P("mucs_L_null_negative", ["--attrib=mucs", "attrib.L_null=-1"], "attrib.L_null=-1", "> 0 or auto"),
    P("mucs_unknown_eval_autocast", ["--attrib=mucs", "attrib.eval_autocast=int8"], "attrib.eval_autocast='int8'"),
    P("mucs_adaptive_blocks_zero", ["--attrib=mucs", "attrib.adaptive=true", "attrib.adaptive_blocks=0"],
      "attrib.adaptive_blocks=0", ">= 1"),
    P("mucs_adaptive_alpha_one", ["--attrib=mucs", "attrib.adaptive_alpha=1"], "attrib.adaptive_alpha=1", "< 1"),
    P("mucs_adaptive_keep_half", ["--attrib=mucs", "attrib.adaptive_keep=0.5"], "attrib.adaptive_keep=0.5", ">= 1"),
    P("mucs_unknown_instance_weighting", ["--attrib=mucs", "attrib.instance_weighting=focal"],
      "attrib.instance_weighting='focal'", "none, inverse_loss"),
    P("dtrak_unknown_projection", ["--attrib=dtrak", "attrib.proj=sparse"], "attrib.proj='sparse'", "gaussian"),
    P("dtrak_projection_size_zero", ["--attrib=dtrak", "attrib.proj_dim=0"], "attrib.proj_dim=0", ">= 1"),
    P("das_unknown_residual", ["--attrib=das", "attrib.residual=abs"], "attrib.residual='abs'", "released, rms"),
    P("abu_damping_negative", ["--attrib=abu", "attrib.damping=-1"], "attrib.damping=-1", ">= 0"),
    P("guda_unknown_objective", ["--attrib=guda", "attrib.objective=forget"], "attrib.objective='forget'",
      "redirect, ascent"),
    P("guda_epochs_zero", ["--attrib=guda", "attrib.epochs=0"], "attrib.epochs=0", ">= 1"),
    P("kernel_unknown_kernel", ["--attrib=kernel", "attrib.kernel=cosine"], "attrib.kernel='cosine'", "gaussian"),
    P("ekfac_unknown_strategy", ["--attrib=ekfac", "attrib.strategy=exact"], "attrib.strategy='exact'",
      "ekfac, kfac, diagonal, identity"),
    P("ekfac_unknown_measurement", ["--attrib=ekfac", "attrib.measurement=kl"], "attrib.measurement='kl'", "loss, elbo"),
    P("ekfac_damping_negative", ["--attrib=ekfac", "attrib.damping=-1"], "attrib.damping=-1", ">= 0 or null"),
    P("kfac_draws_zero", ["--attrib=kfac", "attrib.num_draws=0"], "attrib.num_draws=0", ">= 1"),
    P("journey_unknown_anchor", ["--attrib=journey_trak", "attrib.anchor=end"], "attrib.anchor='end'",
      "x0_hat, trajectory"),
    P("journey_unknown_aggregate", ["--attrib=journey_trak", "attrib.aggregate=max"], "attrib.aggregate='max'",
      "zscore, rank, mean"),
    P("journey_noises_zero", ["--attrib=journey_trak", "attrib.noises=0"], "attrib.noises=0", ">= 1"),
    P("journey_steps_zero", ["--attrib=journey_trak", "attrib.steps=0"], "attrib.steps=0", ">= 1 or null"),
    P("ensemble_of_itself", ["--attrib=ensemble", "attrib.methods=[ensemble]"], "attrib.methods=['ensemble']",
      "other methods"),
    P("ensemble_weights_mismatch", ["--attrib=ensemble", "attrib.weights=[1.0]"], "attrib.weights=[1.0]",
      "one number >= 0 per method"),
    # Slurm: refused before anything is submitted
    P("slurm_subsample_negative", ["--subsample=-5"], "subsample=-5", ">= 0", tool="slurm"),
    P("slurm_a_shards_zero", ["launcher.a_shards=0"], "launcher.a_shards=0", ">= 1", tool="slurm"),
    P("slurm_logo_shards_negative", ["--what=logo", "launcher.logo_shards=-1"], "launcher.logo_shards=-1", ">= 0",
      tool="slurm"),
    P("slurm_num_removal_above_training_set", ["num_removal=100000"], "num_removal 100000", "[1, 1499]", tool="slurm"),
    P("slurm_timeout_zero", ["launcher.timeout_min=0"], "launcher.timeout_min=0", ">= 1", tool="slurm"),
    P("slurm_stage_cpus_zero", ["launcher.stages.a.cpus_per_task=0"], "launcher.stages.a.cpus_per_task=0", ">= 1",
      tool="slurm"),
    # eval.py
    P("eval_unknown_method", ["--methods=random,nope"], "--methods 'random,nope'", "choose from", tool="eval",
      sub=True),
    P("eval_unknown_device", ["--device=gpu"], "--device='gpu'", "cuda:N", tool="eval"),
    P("eval_unknown_metric", ["--metrics=ssim,nope"], "unknown metric 'nope'", "choose from", tool="eval"),
    P("eval_bad_override", ["sample.num_steps=0"], "sample.num_steps=0", ">= 2", tool="eval"),
    # the scripts
    P("grid_subsample_negative", ["--subsample=-5"], "subsample=-5", ">= 0", tool="grid", sub=True),
    P("grid_seeds_not_integers", ["--seeds=a-b"], "--seeds 'a-b'", "integers", tool="grid"),
    P("grid_unknown_method", ["--methods=random,nope"], "--methods 'random,nope'", "choose from", tool="grid"),
    P("guda_eval_unknown_aggregate", ["--aggregate=median"], "--aggregate", "'median'", tool="guda_eval"),
    P("guda_eval_unknown_method", ["--methods=guda,nope"], "--methods 'guda,nope'", "choose from", tool="guda_eval"),
    P("guda_sweep_bad_variant", ["--variants=attrib.alpha=0.03;attrib.epochs=0"], "attrib.epochs=0", ">= 1",
      tool="guda_sweep"),
    P("status_logs_missing", ["--logs=/nonexistent/logs"], "--logs /nonexistent/logs", "not a folder", tool="status"),
    P("removal_seeds_not_integers", ["--seeds=one"], "--seeds 'one'", "integers", tool="removal"),
    P("removal_unknown_method", ["--methods=random,nope"], "--methods 'random,nope'", "choose from", tool="removal"),
    P("bench_rounds_zero", ["--rounds=0"], "--rounds=0", ">= 1", tool="bench"),
    P("bench_bad_override", ["--parts=peak", "train.batch=0"], "train.batch=0", ">= 1", tool="bench"),
    P("bench_unknown_method", ["--parts=peak", "--methods=ekfac,nope"], "unknown attrib 'nope'", "choose from",
      tool="bench"),
]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


ENTRY = {  # tool -> (in-process entry point, command line, arguments every case of the tool gets first)
    "pipeline": (cli.run_pipeline, ["pipeline.py"], []),
    "slurm": (cli.run_pipeline, ["pipeline.py"], ["--launcher=slurm"]),
    "eval": (cli.run_eval, ["eval.py"], ["--jobs=*", "--methods=random"]),
    "grid": (cli.guard(cli.grid_main), ["scripts/launch_grid.py"],
             ["--jobs=digits_dit_edm", "--methods=random", "--seeds=1", "--dry_run"]),
    "guda_eval": (cli.guard(cli.group_eval_main), ["scripts/guda_eval.py"], ["--jobs=*"]),
    "guda_sweep": (cli.guard(cli.sweep_main), ["scripts/guda_sweep.py"], []),
    "status": (cli.guard(cli.status_main), ["scripts/status.py"], []),
    "removal": (lambda argv: cli.guard(script("removal_analysis"))(argv), ["scripts/removal_analysis.py"], []),
    "bench": (lambda argv: cli.guard(script("bench"))(argv), ["scripts/bench.py"], []),
}


def tree(*roots):
    """Every file and folder under the roots (with its size and time for files)."""
    out = {}
    for r in roots:
        if r.exists():
            out.update({str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
                        for p in r.rglob("*")})
    return out


@pytest.fixture(scope="module")
def built(data_root):
    """The digits dataset built once, so no case is the one that builds it."""
    from mucs.data import ensure_dataset
    ensure_dataset("digits", data_root / "digits")
    return data_root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_setting_is_refused_before_any_work(case, built, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(L, "make_executor", lambda *a: pytest.fail("something was submitted"))
    main, command, first = ENTRY[case.tool]
    paths = [f"paths.data={built}", f"paths.logs={tmp_path / 'logs'}", f"paths.plots={tmp_path / 'plots'}",
             f"paths.cache={tmp_path / 'cache'}"]
    args = first + case.args + ([] if case.tool in ("status", "bench") else paths)  # bench's paths are its own
    watched = (tmp_path, built, ROOT / "pointer_to")
    before = tree(*watched)
    if case.sub:
        r = subprocess.run([sys.executable, *command, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))  # this checkout's mucs
        code, err = r.returncode, r.stderr
    else:
        capsys.readouterr()
        code, err = main(args), capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err[-2000:])
    assert "Traceback" not in err
    for w in case.words:
        assert w in lines[0], (w, lines[0])
    assert tree(*watched) == before, f"{case.id} created or changed files"


def test_enough_cases_over_every_entry_point():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES} == set(ENTRY)
