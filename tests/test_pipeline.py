"""The five stages and eval end to end on tiny configs of the real code path, resume, and CLI errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mucs.cli import run_eval, run_pipeline

ROOT = Path(__file__).resolve().parent.parent


def run_dirs(tiny, method):
    logs = Path([o for o in tiny if o.startswith("paths.logs=")][0].split("=", 1)[1])
    name = "digits_dit_edm_s1_k2.0_na3_sb0"
    return logs, logs / f"{name}--pre", logs / f"{name}--post_{method}"


def test_five_stages_and_eval(tiny, capsys):
    for m in ("random", "pixel"):
        assert run_pipeline(["--what=tpre,gpre,a,tpost,gpost", f"--attrib={m}", "--seed=1"] + tiny) == 0
    logs, pre, post = run_dirs(tiny, "pixel")
    for f in ("config.yaml", "model-best.safetensors", "model-last.safetensors", "samples.safetensors", "samples.png",
              "train_log.csv", "tpre.manifest.json", "gpre.manifest.json"):
        assert (pre / f).exists(), f
    s_pre, s_post = load_file(str(pre / "samples.safetensors")), load_file(str(post / "samples.safetensors"))
    assert s_pre["images"].shape == (6, 1, 8, 8) and int(s_pre["num_attrib"]) == 3
    assert torch.equal(s_pre["seeds"], s_post["seeds"]) and torch.equal(s_pre["labels"], s_post["labels"])
    assert not torch.equal(s_pre["images"], s_post["images"])  # another model, same seeds
    a = load_file(str(post / "attrib.safetensors"))
    assert a["scores"].shape == (3, 1500) and a["top_ids"].shape == (3, 10)
    # pixel's top ids are the nearest training items of each target
    from mucs.data import load_split
    data = Path([o for o in tiny if o.startswith("paths.data=")][0].split("=", 1)[1]) / "digits"
    tr = load_split(data, "train")
    d = torch.cdist(s_pre["images"][:3].flatten(1), tr.float_images().flatten(1))
    assert torch.equal(tr.ids[d.argsort(1)[:, :10]].sort(1).values, a["top_ids"].sort(1).values)
    # rerunning skips what is done and says so
    capsys.readouterr()
    assert run_pipeline(["--what=tpre,gpre", "--attrib=pixel"] + tiny) == 0
    assert "done already" in capsys.readouterr().out
    # eval: a table, CSVs and plots
    job = "digits_dit_edm_s1_k2.0_na3_sb0"
    assert run_eval([f"--jobs={job}", "--methods=random,pixel", f"--logs={logs}", "--pval", "--show_controls",
                     "--fn_out=t", "--metrics=ssim,mse,cosine"] + [o for o in tiny if o.startswith("paths.")]) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "pixel" in out
    folder = Path([o for o in tiny if o.startswith("paths.plots=")][0].split("=", 1)[1]) / "t"
    summary = pd.read_csv(folder / "summary.csv")
    assert set(summary.metric) == {"ssim", "mse", "cosine"} and summary.auc_target.between(0, 1).all()
    assert (folder / "densities.png").exists() and (folder / f"grid_targets_{job}.png").exists()


def _cli(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py")] + args, capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kw)


def test_killed_training_resumes_identically(tiny, tmp_path):
    over = [o for o in tiny if not o.startswith(("train.steps", "paths.logs"))] + ["train.steps=120"]
    ref = over + [f"paths.logs={tmp_path / 'ref'}"]
    assert run_pipeline(["--what=tpre"] + ref) == 0
    kill = over + [f"paths.logs={tmp_path / 'kill'}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), "--what=tpre"] + kill, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "kill" / "digits_dit_edm_s1_k2.0_na3_sb0--pre" / "train-state.pt"
    t0 = time.time()
    while not state.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (state.parent / "tpre.manifest.json").exists()
    r = _cli(["--what=tpre"] + kill)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    for f in ("model-last.safetensors", "model-best.safetensors"):
        a = load_file(str(tmp_path / "ref" / "digits_dit_edm_s1_k2.0_na3_sb0--pre" / f))
        b = load_file(str(state.parent / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("args, words", [
    (["--what=tpre,foo"], "unknown stage foo"),
    (["--job=nope"], "unknown job 'nope'"),
    (["--what=gpre"], "run --what=tpre first"),
    (["--attrib=nope"], "unknown attrib 'nope'"),
    (["train.steps"], "malformed override"),
    (["--bogus"], "unknown option --bogus"),
])
def test_bad_input_gives_one_line_error(args, words, tmp_path, data_root):
    r = _cli(args + [f"paths.logs={tmp_path}", f"paths.data={data_root}"])
    assert r.returncode == 2
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_no_exec_prints_plan_and_runs_nothing(tmp_path):
    r = _cli(["--no_exec", "--attrib=pixel", f"paths.logs={tmp_path}"])
    assert r.returncode == 0
    for stage in ("tpre", "gpre", "a", "tpost", "gpost"):
        assert f"] {stage}" in r.stdout
    assert "post_pixel/attrib.safetensors" in r.stdout
    assert not any(tmp_path.iterdir())
