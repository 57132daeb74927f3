"""report.py: what each method attributed, on one self-contained HTML page (every image embedded as a
base64 PNG, no external resource) plus its PNGs, for one evaluation folder written by eval.py.

  per target    the pre image, each method's post image (with its similarity to pre) and its top-k
                attributed training images with their scores        -> report/target_<job>_<t>.png
  controls      pre and every method's post image                    -> report/grid_controls_<job>.png
  tables        AUC and Ratio per method and metric (summary.csv), overlap of top ids (overlap.csv),
                LDS per run when <run>--lds/lds.csv exists (pipeline.py --what=lds)
  densities     eval's densities.png

A script in the page counts, once it has loaded, the images that rendered and the tables, and writes them
into its last line (#render-check): what the headless-browser test reads.
"""
import base64
import html
import io
from pathlib import Path

import pandas as pd
import torch

from mucs import config as C
from mucs.cli import Parser, guard
from mucs.errors import UserError
from mucs.io import atomic_path, write_text

PAGE = "report.html"
STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}figure{margin:.8em 0 1.6em}
figcaption{font-size:.9em;color:#555}img{image-rendering:pixelated;max-width:100%}.note{color:#555;font-size:.9em}"""
CHECK = """<p id="render-check" class="note">(rendering ...)</p>
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var tables = document.querySelectorAll("table").length, p = document.getElementById("render-check");
  p.setAttribute("data-images", imgs.length); p.setAttribute("data-rendered", ok); p.setAttribute("data-tables", tables);
  p.textContent = ok + " of " + imgs.length + " images rendered, " + tables + " tables";
});
</script>"""


def report_args(argv):
    p = Parser(prog="report.py", description="An HTML page (and PNGs) of what each method attributed, for one "
               "evaluation folder of eval.py. Extra key=value arguments are Hydra overrides (e.g. paths.plots=...).")
    p.add_argument("--eval", required=True, help="the evaluation: its --fn_out name under paths.plots, or its folder")
    p.add_argument("--logs", default=None, help="folder of the run folders (default: paths.logs of the config)")
    p.add_argument("--top", type=int, default=10, help="attributed training images shown per target and method")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-")]
    if bad:
        raise UserError(f"unknown option {bad[0]}; see --help")
    if args.top < 1:
        raise UserError(f"--top must be at least 1, not {args.top}")
    return args, rest


# ---------------------------------------------------------------------------------------------
# Pictures


def png_bytes(fig):
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def show(ax, x, title=None):
    """One image in [-1, 1] [C, H, W] on an axis without ticks."""
    x = ((x.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(x.squeeze(-1) if x.shape[-1] == 1 else x, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def target_figure(t, run, methods, train, top, sims, metric):
    """Row 0: the pre image; one row per method: its post image, then its top-`top` training images and scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1 + len(methods), 1 + top, figsize=(1.0 * (1 + top), 1.3 * (1 + len(methods))),
                             squeeze=False, gridspec_kw=dict(hspace=0.55, wspace=0.15))
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].axis("on")
    show(axes[0, 0], run["pre"]["images"][t], "pre")
    axes[0, 1].text(0, 0.5, f"target {t}: held-out id {int(run['pre']['seeds'][t])}, label "
                    f"{int(run['pre']['labels'][t])}", fontsize=8, va="center")
    for r, m in enumerate(methods, start=1):
        post = run["posts"][m]
        sim = sims.get((m, t))
        axes[r, 0].axis("on")
        show(axes[r, 0], post["samples"]["images"][t], "post" + (f" {metric} {sim:.3f}" if sim is not None else ""))
        axes[r, 0].set_ylabel(m, fontsize=8, rotation=0, ha="right", va="center")
        ids = post["top_ids"][t, :top]
        for k, i in enumerate(ids.tolist()):
            axes[r, 1 + k].axis("on")
            show(axes[r, 1 + k], train["images"][train["row"][i]], f"#{k + 1} id {i}\n{post['scores'][t, i]:.3g}")
    return png_bytes(fig)


def training_images(cfg):
    """The training split's images [-1, 1] and a map stable id -> row (top ids are stable ids)."""
    from mucs.data import load_split

    split = load_split(cfg.data.folder, "train")
    return dict(images=split.float_images(), row={int(i): r for r, i in enumerate(split.ids.tolist())})


def load_runs(logs, jobs, methods):
    """eval's runs, each method with its scores by stable id (scores[t, id])."""
    from mucs.attrib.base import load_attrib
    from mucs.evaluation import load_run

    runs = []
    for job in jobs:
        cfg, pre_dir, pre, posts = load_run(logs, job, methods)
        for p in posts.values():
            a = load_attrib(p["dir"])
            by_id = torch.full((a["scores"].shape[0], int(a["train_ids"].max()) + 1), float("nan"))
            by_id[:, a["train_ids"]] = a["scores"].float()
            p["scores"] = by_id
        runs.append(dict(job=job, cfg=cfg, pre_dir=pre_dir, pre=pre, posts=posts))
    return runs


# ---------------------------------------------------------------------------------------------
# The page


def img_tag(data, alt):
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def table_html(df, caption=None):
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return df.to_html(index=False, border=0, na_rep="-").replace("<thead>", f"{cap}<thead>", 1)


def summary_tables(summary):
    """AUC and Ratio per method (rows) and metric (columns), targets and controls."""
    ratio = summary.assign(cell=[f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in
                                 zip(summary.ratio_target, summary.ratio_target_lo, summary.ratio_target_hi)])
    out = []
    for title, df, col, fmt in (
            ("AUC against random, targets (> 0.5: the method's removal changed targets more than random removal)",
             summary, "auc_target", "{:.3f}"),
            ("Ratio % against random's median, targets, with 95% interval (negative: more change)", ratio, "cell", None),
            ("p-value, one-sided Mann-Whitney U, targets", summary, "p_target", "{:.2g}"),
            ("AUC against random, controls (should stay near 0.5)", summary, "auc_control", "{:.3f}")):
        if col not in df:
            continue
        piv = df.pivot(index="method", columns="metric", values=col).reindex(pd.unique(df.method))
        if fmt:
            piv = piv.map(lambda v: fmt.format(v) if pd.notna(v) else "-")
        piv.columns.name = None
        out.append(f"<h3>{html.escape(title)}</h3>" + table_html(piv.reset_index()))
    return "\n".join(out)


def lds_section(logs, jobs):
    parts = []
    for job in jobs:
        path = Path(logs) / f"{job}--lds" / "lds.csv"
        if path.exists():
            df = pd.read_csv(path)
            for c in ("lds", "lo", "hi"):
                df[c] = df[c].map("{:.3f}".format)
            parts.append(f"<h3>{html.escape(job)}</h3>" + table_html(
                df, "LDS: Spearman across subsets of the summed scores of each subset's items vs minus the measured "
                    "loss of the subset's models, mean over queries (95% bootstrap interval)"))
    return "\n".join(parts)


def write_report(folder, logs, top=10):
    """Write <folder>/report.html and <folder>/report/*.png for the evaluation in `folder`; returns the page."""
    folder = Path(folder)
    if not (folder / "summary.csv").exists() or not (folder / "sims.csv").exists():
        raise UserError(f"{folder} is not an evaluation folder (no summary.csv / sims.csv); run eval.py first")
    summary, sims = pd.read_csv(folder / "summary.csv"), pd.read_csv(folder / "sims.csv")
    jobs, methods = list(pd.unique(sims.job)), list(pd.unique(sims.method))
    metric = str(summary.metric.iloc[0])
    runs = load_runs(logs, jobs, methods)
    pngs = folder / "report"
    from mucs.plots import grids

    grids(runs, methods, pngs, controls=True)
    body = [f"<h1>Attribution report: {html.escape(folder.name)}</h1>",
            f"<p>{len(jobs)} run(s): {html.escape(', '.join(jobs))}<br>methods: {html.escape(', '.join(methods))}; "
            f"similarity shown with the images: {html.escape(metric)} (pre vs post)</p>",
            "<h2>Counterfactual evaluation</h2>", summary_tables(summary)]
    if (folder / "overlap.csv").exists():
        ov = pd.read_csv(folder / "overlap.csv")
        body.append("<h3>Overlap of top ids</h3>" + table_html(ov.assign(overlap=ov.overlap.map("{:.3f}".format)),
                    "within a method (a = b): across its targets; between methods: on the same target"))
    if (folder / "densities.png").exists():
        body.append("<h2>Similarity densities (targets)</h2>" + img_tag((folder / "densities.png").read_bytes(),
                                                                         "densities"))
    lds = lds_section(logs, jobs)
    if lds:
        body += ["<h2>Linear datamodeling score</h2>", lds]
    body.append("<h2>Targets</h2>")
    for r in runs:
        train = training_images(r["cfg"])
        s = sims[sims.job == r["job"]]
        by = {(m, int(i)): float(v) for m, i, v in zip(s.method, s["sample"], s[metric])}
        body.append(f"<h3>{html.escape(r['job'])}</h3>")
        for t in range(int(r["pre"]["num_attrib"])):
            data = target_figure(t, r, methods, train, top, by, metric)
            with atomic_path(pngs / f"target_{r['job']}_{t:03d}.png") as tmp:
                tmp.write_bytes(data)
            alt = f"target {t}; top ids: " + "; ".join(
                f"{m} {' '.join(map(str, r['posts'][m]['top_ids'][t, :top].tolist()))}" for m in methods)
            body.append(f"<figure>{img_tag(data, alt)}<figcaption>{html.escape(r['job'])}, target {t}: "
                        f"pre image, each method's post image, and its top {top} training images (id, score)"
                        f"</figcaption></figure>")
    body.append("<h2>Controls</h2>")
    for r in runs:
        grid = pngs / f"grid_controls_{r['job']}.png"
        body.append(f"<figure>{img_tag(grid.read_bytes(), 'controls')}<figcaption>{html.escape(r['job'])}: controls, "
                    f"pre (top row) and each method's post image</figcaption></figure>")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>mucs report: '
            f'{html.escape(folder.name)}</title><style>{STYLE}</style></head>\n<body>\n' + "\n".join(body)
            + f"\n{CHECK}\n</body></html>\n")
    write_text(folder / PAGE, page)
    return folder / PAGE


def report_main(argv):
    args, overrides = report_args(argv)
    base = C.compose(overrides)  # for paths.plots and paths.logs
    folder = Path(args.eval) if Path(args.eval).is_dir() else Path(base.paths.plots) / args.eval
    if not folder.is_dir():
        raise UserError(f"no evaluation folder {args.eval} (nor {folder}); run eval.py --fn_out={args.eval} first")
    page = write_report(folder, args.logs or base.paths.logs, args.top)
    print(f"[report] {page} ({page.stat().st_size / 1e6:.1f} MB, self-contained) and its PNGs in {folder / 'report'}")
    return 0


run_report = guard(report_main)
