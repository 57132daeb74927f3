"""report.py on a real evaluation of the tiny pipeline: one self-contained HTML page and its PNGs, loaded in a
real headless browser (Debian's chromium) that must render every image and table."""
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from mucs.cli import run_eval, run_pipeline
from mucs.reporting import run_report

RUN = "digits_dit_edm_s1_k2.0_na3_sb0"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser():
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("chromium is not installed (as root: apt-get install -y chromium; .ci/run does it); the "
                    "headless-browser check of the report needs it")
    return exe


def run_browser(exe, tmp_path, *args):
    out = subprocess.run([exe, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_is_self_contained_and_renders_in_chromium(tiny, tmp_path, capsys):
    exe = browser()
    paths = [o for o in tiny if o.startswith("paths.")]
    logs, plots = (Path([o for o in tiny if o.startswith(f"paths.{k}=")][0].split("=", 1)[1]) for k in ("logs", "plots"))
    tiny = [o for o in tiny if not o.startswith("train.steps=")] + ["train.steps=8"]  # what the models learn is not the point
    for m in ("random", "pixel"):
        assert run_pipeline(["--what=tpre,gpre,a,tpost,gpost", f"--attrib={m}"] + tiny) == 0
    assert run_pipeline(["--what=lds", "lds.num_subsets=3", "lds.num_seeds=1", "lds.steps=8", "lds.num_noises=4"]
                        + tiny) == 0
    assert run_eval([f"--jobs={RUN}", "--methods=random,pixel", "--fn_out=ev", "--metrics=ssim,mse",
                     "--show_controls"] + paths) == 0
    capsys.readouterr()
    assert run_report(["--eval=ev", "--top=4"] + paths) == 0
    assert "report.html" in capsys.readouterr().out
    folder = plots / "ev"
    page = (folder / "report.html").read_text()

    # self-contained: every image inline, nothing fetched from elsewhere
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:image/png;base64,)', page)
    assert "http://" not in page and "https://" not in page and "url(" not in page
    n_img, n_tables = page.count("<img "), page.count("<table")
    assert n_img == 1 + 3 + 1  # densities, 3 targets, the controls grid
    assert n_tables == 4 + 1 + 1  # AUC, Ratio, p, control AUC; overlap; LDS
    assert "Linear datamodeling score" in page and "pixel" in page
    # each target's picture names the methods' top ids, in rank order, as the attribution file has them
    top = load_file(str(logs / f"{RUN}--post_pixel" / "attrib.safetensors"))["top_ids"]
    for t in range(3):
        assert f"pixel {' '.join(map(str, top[t, :4].tolist()))}" in page
    # and the PNGs beside it
    pngs = sorted((folder / "report").glob("target_*.png"))
    assert len(pngs) == 3 and (folder / "report" / f"grid_controls_{RUN}.png").exists()
    assert all(Image.open(p).size[0] > 100 for p in pngs)

    # a real browser loads it: every image decoded (naturalWidth > 0), every table there
    dom = run_browser(exe, tmp_path, "--dump-dom", (folder / "report.html").as_uri())
    check = re.search(r'id="render-check"[^>]*>', dom)
    assert check, dom[-500:]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', check.group(0)))
    assert attrs == {"images": str(n_img), "rendered": str(n_img), "tables": str(n_tables)}
    # and paints it: the screenshot is not blank
    shot = tmp_path / "shot.png"
    run_browser(exe, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", (folder / "report.html").as_uri())
    px = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
    assert px.std() > 20 and (px < 128).mean() > 0.01


def test_report_of_a_folder_that_is_no_evaluation(tiny, tmp_path, capsys):
    assert run_report([f"--eval={tmp_path}"] + [o for o in tiny if o.startswith("paths.")]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err
    assert run_report(["--eval=nope"] + [o for o in tiny if o.startswith("paths.")]) == 2
    assert "run eval.py --fn_out=nope first" in capsys.readouterr().err
