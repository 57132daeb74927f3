"""eval.py: compare pre and post images of every method across jobs (seeds) against random removal."""
import fnmatch
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mucs import config as C
from mucs import metrics as M
from mucs import stats
from mucs.attrib.base import load_attrib
from mucs.errors import UserError
from mucs.generate import load_samples
from mucs.io import atomic_path, file_hash, read_json
from mucs.manifest import check_finished


def find_jobs(spec, logs):
    names = sorted({d.name[: -len("--pre")] for d in Path(logs).glob("*--pre") if d.is_dir()})
    out = []
    for s in [s.strip() for s in spec.split(",") if s.strip()]:
        hits = [n for n in names if fnmatch.fnmatchcase(n, s)]
        if not hits:
            raise UserError(f"no run folder {s}--pre in {logs}; run pipeline.py for that job first "
                            f"(known: {', '.join(names[:6]) or 'none'})")
        out += [h for h in hits if h not in out]
    return out


def load_run(logs, job, methods):
    """Pre samples, and per method its post samples and top ids, checked to share seeds."""
    pre_dir = Path(logs) / f"{job}--pre"
    cfg = C.load_saved(pre_dir / "config.yaml")
    check_finished(pre_dir, "gpre")
    pre = load_samples(pre_dir)
    posts = {}
    for m in methods:
        d = Path(logs) / f"{job}--post_{m}"
        if not d.exists():
            raise UserError(f"no run folder {d}; run pipeline.py --attrib={m} for job {job} first")
        for stage in ("a", "tpost", "gpost"):  # finished, and made from the pre samples and ids there now
            check_finished(d, stage)
        post = load_samples(d, stage="gpost")
        if not torch.equal(post["seeds"], pre["seeds"]):
            raise UserError(f"pre and post samples of {job} / {m} have different seeds; rerun --what=gpost --force")
        posts[m] = dict(samples=post, top_ids=load_attrib(d)["top_ids"], dir=d,
                        targets=read_json(d / "a.manifest.json")["settings"].get("targets"))
    return cfg, pre_dir, pre, posts


def target_set(post):
    """What a method's union of removed ids was computed over: how many targets, and which."""
    return f"{len(post['top_ids'])} " + (f"targets {post['targets']}" if post["targets"] else "gpre targets")


def unequal(job, posts):
    """{method: why} for each method whose removal is not like random's: another number of ids per target, or a
    union over another target set (other targets= or another number of them)."""
    ref, out = posts["random"], {}
    for m, p in posts.items():
        k, k_ref = p["top_ids"].shape[1], ref["top_ids"].shape[1]
        if k != k_ref:
            out[m] = f"{m} removes {k} ids per target in {job}, random {k_ref}"
        elif target_set(p) != target_set(ref):
            out[m] = f"{m}'s union in {job} is over {target_set(p)}, random's over {target_set(ref)}"
    return out


def check_like_with_like(runs, allow):
    """Refuse (or with `allow`, return to mark) the methods whose removal is not comparable with random's."""
    notes = {}
    for r in runs:
        for m, why in unequal(r["job"], r["posts"]).items():
            notes.setdefault(m, why)
    if notes and not allow:
        m, why = next(iter(notes.items()))
        raise UserError(f"{why}: the evaluation compares like with like; rerun {m} or random with the same num_removal "
                        f"(--topk_factor, num_removal) and targets, or pass --allow_unequal (the table marks them)")
    return notes


def similarities(metrics, pre, post, cache, recompute):
    """Per-sample similarity of each metric, cached in the post folder against the samples' hashes."""
    key = f"{file_hash(cache['pre'])}-{file_hash(cache['post'])}"
    path = cache["dir"] / "eval-sims.csv"
    old = pd.read_csv(path) if path.exists() and not recompute else None
    if old is not None and (old.get("key", pd.Series([""])).iloc[0] != key):
        old = None
    out = pd.DataFrame({"sample": np.arange(len(pre)), "key": key})
    for name, metric in metrics.items():
        if old is not None and name in old:
            out[name] = old[name].values
        else:
            out[name] = metric(pre, post)
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return out


def summarize(sims, metrics, methods):
    """One row per (method, metric): target AUC/Ratio/p against random, and the same on controls."""
    rows = []
    for m in methods:
        for name, metric in metrics.items():
            row = dict(method=m, metric=name)
            for part in ("target", "control"):
                s = sims[sims.part == part]
                a, r = s[s.method == m], s[s.method == "random"]
                sign = 1 if metric.higher_is_similar else -1
                row[f"auc_{part}"] = stats.auc(sign * a[name].values, sign * r[name].values)
                med = r.groupby("job")[name].median()
                mean, lo, hi = stats.ratio(a[name].values, a.job.map(med).values, metric.higher_is_similar)
                row[f"ratio_{part}"], row[f"ratio_{part}_lo"], row[f"ratio_{part}_hi"] = mean, lo, hi
                row[f"p_{part}"] = stats.pvalue(sign * a[name].values, sign * r[name].values, two_sided=part == "control")
                row[f"n_{part}"] = len(a)
            rows.append(row)
    return pd.DataFrame(rows)


def overlaps(runs, methods):
    rows = []
    for m in methods:
        within = [stats.overlap_within(p["posts"][m]["top_ids"]) for p in runs]
        rows.append(dict(a=m, b=m, overlap=float(np.nanmean(within))))
    for i, m in enumerate(methods):
        for n in methods[i + 1:]:
            vals = [stats.overlap_between(p["posts"][m]["top_ids"], p["posts"][n]["top_ids"]) for p in runs]
            rows.append(dict(a=m, b=n, overlap=float(np.nanmean(vals))))
    return pd.DataFrame(rows)


def format_table(summary, pval, controls, unequal=()):
    t = pd.DataFrame({"method": [f"{m} *" if m in unequal else m for m in summary.method], "metric": summary.metric})
    t["AUC"] = summary.auc_target.map("{:.3f}".format)
    t["Ratio %"] = [f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in
                    zip(summary.ratio_target, summary.ratio_target_lo, summary.ratio_target_hi)]
    if pval:
        t["p (1-sided)"] = summary.p_target.map("{:.2g}".format)
    if controls:
        t["ctrl AUC"] = summary.auc_control.map("{:.3f}".format)
        t["ctrl Ratio %"] = summary.ratio_control.map("{:+.1f}".format)
        if pval:
            t["ctrl p (2-sided)"] = summary.p_control.map("{:.2g}".format)
    t["n"] = summary.n_target
    return t.to_string(index=False)


def evaluate(jobs, methods, logs, out, metrics=None, cache=None, calc_ref=False, plots=True, show_controls=False,
             device="auto", allow_unequal=False):
    """The counterfactual evaluation of `methods` (random first) over the run names `jobs` in `logs`: per-sample
    similarities, the pooled and per-seed summaries and the overlap of top ids, written as CSVs (and plots) into
    `out`. A method that removes another number of ids per target than random, or over another target set, is
    refused unless `allow_unequal` (then marked). Returns dict(sims, summary, per_seed, overlap, out, notes)."""
    methods = [m.strip() for m in methods if m.strip()]
    if "random" not in methods:
        raise UserError("--methods must include random: every method is measured against random removal")
    methods = ["random"] + [m for m in methods if m != "random"]
    names, skip_missing = M.resolve(metrics)
    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)

    runs = []
    for job in jobs:
        cfg, pre_dir, pre, posts = load_run(logs, job, methods)
        runs.append(dict(job=job, cfg=cfg, pre_dir=pre_dir, pre=pre, posts=posts))
    notes = check_like_with_like(runs, allow_unequal)
    data = {(r["cfg"].data.name, r["cfg"].data.folder) for r in runs}
    if len(data) > 1:
        raise UserError(f"the jobs use different datasets {sorted(data)}; evaluate them separately")
    dcfg = runs[0]["cfg"].data
    metric_fns = {}
    for n in names:
        try:
            metric_fns[n] = M.make_metric(n, dcfg.folder, dcfg.name, cache, dcfg.get("ssim_upsample", 1), device)
        except UserError as e:
            if not skip_missing:
                raise
            print(f"[eval] skipping metric {n}: {e}")

    frames = []
    for r in runs:
        n_t = int(r["pre"]["num_attrib"])
        for m in methods:
            p = r["posts"][m]
            s = similarities(metric_fns, r["pre"]["images"], p["samples"]["images"],
                             dict(pre=r["pre_dir"] / "samples.safetensors", post=p["dir"] / "samples.safetensors",
                                  dir=p["dir"]), calc_ref)
            s.insert(0, "method", m)
            s.insert(0, "job", r["job"])
            s["seed"] = r["pre"]["seeds"].numpy()
            s["part"] = np.where(np.arange(len(s)) < n_t, "target", "control")
            frames.append(s.drop(columns=["key"]))
    sims = pd.concat(frames, ignore_index=True)
    summary = summarize(sims, metric_fns, methods)
    summary["unequal"] = [notes.get(m, "") for m in summary.method]
    res = dict(sims=sims, summary=summary,
               per_seed=pd.concat([summarize(sims[sims.job == j], metric_fns, methods).assign(job=j) for j in jobs]),
               overlap=overlaps(runs, methods), out=Path(out), notes=notes)
    res["out"].mkdir(parents=True, exist_ok=True)
    for name in ("sims", "summary", "per_seed", "overlap"):
        with atomic_path(res["out"] / f"{name}.csv") as tmp:
            res[name].to_csv(tmp, index=False)
    if plots:
        from mucs.plots import densities, grids
        densities(sims, metric_fns, methods, res["out"])
        grids(runs, methods, res["out"], show_controls)
    return res


def print_evaluation(res, pval=False, show_controls=False):
    """eval.py's printed table: the pooled summary (random left out next to other methods), and the overlaps."""
    summary, notes = res["summary"], res["notes"]
    shown = summary[summary.method != "random"] if summary.method.nunique() > 1 else summary
    print(f"\nCounterfactual evaluation: {res['per_seed'].job.nunique()} job(s), {summary.n_target.iloc[0]} targets "
          f"per method pooled (AUC > 0.5: the method's removal changed targets more than random removal)")
    print(format_table(shown, pval, show_controls, notes))
    for why in notes.values():
        print(f"* not like with like (--allow_unequal): {why}")
    print("\nOverlap of top ids (within a method: across its targets; between methods: same target)")
    print(res["overlap"].to_string(index=False, float_format="{:.3f}".format))
    print(f"\n[eval] tables and plots in {res['out']}")
