"""The commands of the documentation's how-to pages run as written: every command in a fenced bash or python
block of docs/getting-started.md, own-images.md, datasets.md and adding-a-method.md is run in a fresh copy of the
project, with CPU-small overrides appended to each pipeline/eval/report/demo command (a tiny model trained for 24
steps, MUCS with 8 noises). A command that cannot run here carries a marker in its comment (`cluster-only`,
`needs-download`); any other command the harness does not know fails the test, so a page cannot gain an
untested command.

Stand-ins, so the pages run in minutes: the copy's `.venv` is this interpreter (the installation itself is what
`.ci/run` exercises), and eval's `feat` classifier is an untrained network of the right shape (eval would
otherwise train it for minutes); what is checked is that the commands work and write what the pages say."""
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, TINY

DOCS = ROOT / "docs"
MARKERS = ("cluster-only", "needs-download")
SMALL = [o for o in TINY if not o.startswith(("num_attrib=", "control_factor="))] + [
    "job_attrib.mucs.num_noises=8", "job_attrib.mucs.null_batches=10"]  # run names stay those of the pages
COPY = ["mucs", "configs", "scripts", "examples", "pipeline.py", "eval.py", "report.py", "install_requirements.sh",
        "requirements.txt", "pyproject.toml"]
RUN = "pointer_to/logs/digits_dit_edm_s1_k2.0_na20_sb0"


def fenced(page):
    """The (language, code) of every ```bash and ```python block of a docs page, in order; a block that only
    shows a file of the project (`--8<-- "path"`) is not a command (the file is tested where it is used)."""
    blocks = re.findall(r"^```(bash|python)\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S)
    return [(lang, code) for lang, code in blocks if not code.startswith("--8<--")]


def bash_commands(code):
    """(tokens, marked) per command of a bash block: continuation lines joined, comments dropped."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            comment = line.split("#", 1)[1] if "#" in line else ""
            out.append((tokens, any(m in comment for m in MARKERS)))
    return out


def small_for(tokens):
    """SMALL without the keys the command sets itself."""
    keys = {t.split("=", 1)[0] for t in tokens if "=" in t and not t.startswith("-")}
    return [o for o in SMALL if o.split("=", 1)[0] not in keys]


def argv(tokens):
    """How the harness runs a command of the docs: python entry points and the demo with SMALL appended, set-up
    and file commands as written. Anything else must carry a marker."""
    if tokens[0] == "python" and tokens[1] in ("pipeline.py", "eval.py", "report.py"):
        return [sys.executable, *tokens[1:], *small_for(tokens)]
    if tokens[:2] == ["bash", "scripts/demo.sh"]:
        return ["bash", *tokens[1:], *([] if "--" in tokens else ["--"]), *small_for(tokens)]
    if tokens == ["bash", "install_requirements.sh"] or tokens[0] == "cp":
        return tokens
    raise AssertionError(f"the docs command {shlex.join(tokens)!r} is neither run by tests/test_docs_commands.py nor "
                         f"marked ({' or '.join(MARKERS)} in its comment)")


def fake_venv(copy):
    """.venv/bin/python runs this interpreter; the stamp says the requirements are installed, as
    install_requirements.sh computes it."""
    exe = copy / ".venv" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    exe.chmod(0o755)
    stamp = b"".join((copy / f).read_bytes() for f in ("requirements.txt", "pyproject.toml", "install_requirements.sh"))
    (copy / ".venv" / ".mucs-installed").write_text(hashlib.sha256(stamp).hexdigest()[:16] + "\n")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The digits dataset and a stand-in feature classifier, made once and copied into each project copy."""
    from mucs.classifier import SmallCNN
    from mucs.data import build_digits
    from mucs.io import save_tensors

    root = tmp_path_factory.mktemp("seeds")
    build_digits(root / "data" / "digits")
    save_tensors(root / "cache" / "digits-classifier.safetensors", SmallCNN(1, 10).state_dict())
    return root


@pytest.fixture
def project(tmp_path, seeds):
    """A fresh copy of the project to run a page's commands in (pointer_to inside it, as on a new clone)."""
    copy = tmp_path / "project"
    for name in COPY:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, copy / name)
    for sub in ("data", "cache", "logs", "plots"):
        (copy / "pointer_to" / sub).mkdir(parents=True)
    shutil.copytree(seeds / "data" / "digits", copy / "pointer_to" / "data" / "digits")
    shutil.copy(seeds / "cache" / "digits-classifier.safetensors", copy / "pointer_to" / "cache")
    fake_venv(copy)
    return copy


def run_page(page, copy):
    """Run every block of `page` in `copy`; returns the stdout of each command, in order."""
    env = {k: v for k, v in os.environ.items() if k != "MUCS_POINTER_TO"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(copy), PATH=f"{copy / '.venv' / 'bin'}:{env['PATH']}")
    outputs = []
    for lang, code in fenced(page):
        runs = [argv(t) for t, marked in bash_commands(code) if not marked] if lang == "bash" else [
            [sys.executable, "-c", code]]
        for cmd in runs:
            r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{page}: {shlex.join(cmd[:6])} ... failed:\n{r.stderr[-3000:]}"
            outputs.append(r.stdout)
    return outputs


def test_a_new_command_must_be_run_or_marked():
    assert bash_commands("torchrun --nproc_per_node=8 pipeline.py   # cluster-only\n") == [
        (["torchrun", "--nproc_per_node=8", "pipeline.py"], True)]
    with pytest.raises(AssertionError, match="neither run by"):
        argv(["torchrun", "--nproc_per_node=8", "pipeline.py"])
    with pytest.raises(AssertionError, match="neither run by"):
        argv(["bash", "scripts/run_tests.sh"])
    assert SMALL[0] == "train.steps=24"  # a key the command sets itself is not appended again
    assert argv(["python", "pipeline.py", "--what=tpre", "train.steps=5"]) == [
        sys.executable, "pipeline.py", "--what=tpre", "train.steps=5", *SMALL[1:]]


def test_getting_started_commands(project):
    out = run_page("getting-started.md", project)
    assert "[setup] .venv is up to date" in out[0]
    for m in ("random", "pixel", "mucs"):
        assert (project / f"{RUN}--post_{m}" / "gpost.manifest.json").exists()
    header = lambda text: next(line.split() for line in text.splitlines() if line.lstrip().startswith("method metric"))
    table = next(o for o in out if "Counterfactual evaluation" in o and "mucs" in o)
    assert '--8<-- "docs/assets/demo_eval.txt"' in (DOCS / "getting-started.md").read_text()
    assert header(table) == header((DOCS / "assets" / "demo_eval.txt").read_text())  # the columns the page explains
    assert (project / "pointer_to" / "plots" / "first" / "report.html").exists()


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")


def test_own_images_commands(project):
    from mucs.data import load_split

    write_pngs(project / "my_pngs", load_split(project / "pointer_to" / "data" / "digits", "test").images[:3])
    out = run_page("own-images.md", project)
    cli = load_file(project / f"{RUN}--post_mucs" / "attrib.safetensors")
    assert cli["scores"].shape == (3, 1500)
    assert out[-2].strip() == out[-1].strip() == str(cli["top_ids"][:, :10])  # the CLI's ids, printed twice


def test_datasets_own_folder_commands(project):
    from mucs.data import load_split

    d = load_split(project / "pointer_to" / "data" / "digits", "train")
    for c in range(3):  # my_images/<class>/*.png: 100 digits of each of 3 classes
        write_pngs(project / "my_images" / f"digit{c}", d.images[d.labels == c][:100])
    run_page("datasets.md", project)
    train = load_split(project / "pointer_to" / "data" / "mine", "train")
    assert len(train) == 270 and sorted(train.labels.unique().tolist()) == [0, 1, 2]
    post = project / "pointer_to" / "logs" / "mine_s1_k2.0_na5_sb0--post_pixel"
    assert (post / "gpost.manifest.json").exists()
    assert torch.isin(load_file(post / "attrib.safetensors")["top_ids"], train.ids).all()


def test_adding_a_method_commands(project, monkeypatch):
    out = run_page("adding-a-method.md", project)
    example = (ROOT / "examples" / "denoised_nn.py").read_text()
    assert (project / "mucs" / "attrib" / "denoised_nn.py").read_text() == example
    assert "torch.Size([20, 1500])" in out[3]
    assert (project / f"{RUN}--post_denoised_nn" / "gpost.manifest.json").exists()
    assert re.search(r"^\s*denoised_nn\s+ssim ", out[-1], re.M), out[-1]

    # the known answer of the page: a training image as a target ranks an identical image first
    import mucs
    from mucs.attrib import base
    from mucs.data import load_split
    from omegaconf import OmegaConf

    monkeypatch.setattr(base, "REGISTRY", dict(base.REGISTRY))  # the example registers itself in a copy
    spec = importlib.util.spec_from_file_location("denoised_nn", ROOT / "examples" / "denoised_nn.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    model = mucs.load(project / f"{RUN}--pre", device="cpu")
    train = load_split(project / "pointer_to" / "data" / "digits", "train")
    ctx = base.Context(model.cfg, model.D, train, model.meta, "cpu", project, project)
    method = base.get_method("denoised_nn")(OmegaConf.load(ROOT / "examples" / "denoised_nn.yaml"), ctx)
    method.prepare()
    pick = torch.tensor([0, 7, 100, 1499])
    scores = method.score(train.float_images()[pick], None, torch.arange(4))
    assert scores.shape == (4, len(train))
    assert torch.equal(train.images[scores.argmax(1)], train.images[pick])
    assert not torch.equal(scores[0], scores[1])  # and the ranking depends on the target
    assert np.isfinite(scores.numpy()).all()
