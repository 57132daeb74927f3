"""LOGO, the ground truth of group-wise attribution, and the evaluation of group rankings against it.

Stage `logo` (pipeline.py --what=logo): for each group k (mucs.groups) retrain from scratch, same seed and recipe
as tpre, without group k, in <run>--logo/g<k>/ (one resumable training each); then score the queries (the `a`
targets: gpre's first num_attrib samples, or cfg.targets) by dELBO_k against the pre model with the same noise
as GUDA (mucs.attrib.guda.group_delbo)  ->  <run>--logo/logo.safetensors (scores [Q, K], seconds).
`--shard i/n` trains groups i, i+n, ... only, so n processes (or machines) train side by side; `--shard -1/n`
then scores and finishes the stage. Without --shard one process does it all.

scripts/guda_eval.py: per query, the rankings of groups by GUDA and by instance methods (item scores from their
attrib.safetensors summed, averaged or maxed per group) against LOGO's: Top-1 agreement, MRR, NDCG@3, Top-3
overlap, RBO (p 0.9), Spearman (mucs.ranking), averaged over queries; and GUDA's wall time against LOGO's.
"""
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mucs import config as C
from mucs.errors import UserError
from mucs.generate import SAMPLES, load_samples
from mucs.groups import collapse, load_groups, without
from mucs.io import atomic_path, load_tensor_metadata, load_tensors, read_json, save_tensors, write_json, write_text
from mucs.manifest import check_finished
from mucs.precision import scoring
from mucs.stages import MADE, SCORED, TRAINED, Job, Stage, add, attrib_context, data_files, targets_of
from mucs.train import STATE, train

LOGO = "logo.safetensors"
GROUP_SCORES = "group_scores.safetensors"  # a method's group view, in its post folder
RECORD = "logo-train.json"


def logo_dir(cfg):
    return C.run_dir(cfg, "logo")


def group_dir(folder, k):
    return Path(folder) / f"g{k:03d}"


def logo_inputs(job):
    """What the stage reads: the pre model, the queries, the data and the group table."""
    table = [(Path(job.cfg.groups.table), "data")] if job.cfg.groups.source == "table" and job.cfg.groups.table else []
    return ([(job.weights(job.pre), "tpre")] + ([] if job.cfg.targets else [(job.pre / SAMPLES, "gpre")])
            + data_files(job) + table)


def group_units(K):
    return K, f"there are {K} groups"


def shard_groups(K, shard):
    return [] if shard[0] == -1 else list(range(shard[0], K, shard[1]))


def run_logo(job, shard=(0, 1)):
    folder = logo_dir(job.cfg)
    groups = load_groups(job.cfg.groups, job.train_split, job.meta)
    if job.world.main:
        write_text(folder / "config.yaml", C.to_yaml(job.cfg))
        write_text(folder / "groups.csv", "id,group\n" + "".join(
            f"{i},{groups.names[g]}\n" for i, g in zip(groups.ids.tolist(), groups.index.tolist())))
    for k in shard_groups(len(groups), shard):
        train_group(job, groups, k)
    if (shard[1] == 1 or shard[0] == -1) and job.world.main:
        score_logo(job, groups)


def train_group(job, groups, k):
    """LOGO model k: the pre recipe on the training split without group k (resumes; returns at once if done)."""
    d, name = group_dir(logo_dir(job.cfg), k), groups.names[k]
    if (d / RECORD).exists() and job.weights(d).exists():
        print(f"[logo {name}] already trained ({d})")
        return
    kept = without(job.train_split, groups, k)
    t0 = time.time()
    out = train(job.cfg, kept, job.test_split, job.meta, d, job.device, desc=f"logo {name}", world=job.world)
    if job.world.main and not (d / RECORD).exists():  # seconds of the attempt that finished it
        write_json(d / RECORD, dict(group=name, removed=len(groups.members(k)), kept=len(kept),
                                    seconds=round(time.time() - t0, 2), **out))
        (d / STATE).unlink(missing_ok=True)  # done: the resume state is 4x the weights, K of them per seed


def score_logo(job, groups):
    from mucs.attrib.guda import group_delbo

    folder, K = logo_dir(job.cfg), len(groups)
    missing = [groups.names[k] for k in range(K) if not (group_dir(folder, k) / RECORD).exists()]
    if missing:
        raise UserError(f"LOGO models of groups {missing[:10]} are not trained yet in {folder}; run their shards "
                        f"(--what=logo --shard i/n) or --what=logo without --shard first")
    x, labels = targets_of(job)
    t0 = time.time()
    with scoring(job.cfg):
        G = group_delbo(attrib_context(job), lambda k: job.denoiser(group_dir(folder, k)), K, x, labels)
    seconds = [read_json(group_dir(folder, k) / RECORD)["seconds"] for k in range(K)]
    save_tensors(folder / LOGO, dict(scores=G, train_seconds=torch.tensor(seconds, dtype=torch.float64),
                                     group_sizes=groups.sizes()),
                 metadata=dict(groups=groups.names, score_seconds=round(time.time() - t0, 3), queries=len(x)))
    print(f"[logo] {K} groups x {len(x)} queries scored; top group per query: "
          f"{', '.join(groups.names[int(i)] for i in G.argmax(1)[:10])}{' ...' if len(x) > 10 else ''}")


def clear_logo(job, shard=(0, 1)):
    """--force: forget the trainings of this shard's groups (all groups without --shard; none for -1/n)."""
    folder = logo_dir(job.cfg)
    K = len(load_groups(job.cfg.groups, job.train_split, job.meta))
    for k in shard_groups(K, shard):
        for f in (STATE, RECORD):
            (group_dir(folder, k) / f).unlink(missing_ok=True)


def load_logo(folder):
    t = load_tensors(Path(folder) / LOGO, what="LOGO scores", hint="run pipeline.py --what=logo")
    return t, load_tensor_metadata(Path(folder) / LOGO, what="LOGO scores")


# ---------------------------------------------------------------------------------------------
# Evaluation against LOGO


def run_groups(logo_folder):
    """The groups of a LOGO run, from its saved config."""
    from mucs.data import ensure_dataset, load_split, subsample

    cfg = C.load_saved(Path(logo_folder) / "config.yaml")
    meta = ensure_dataset(cfg.data.name, cfg.data.folder)
    split = subsample(load_split(cfg.data.folder, "train"), int(cfg.subsample), seed=0)
    return cfg, load_groups(cfg.groups, split, meta)


def method_groups(post, groups, how, n_queries):
    """A method's group scores [Q, K] from its item scores, also saved in its post folder (GROUP_SCORES)."""
    from mucs.attrib.base import load_attrib

    a = load_attrib(post)
    if not torch.equal(a["train_ids"], groups.ids):
        raise UserError(f"{post} ranks another training split than the LOGO run (other data or --subsample)")
    if len(a["scores"]) != n_queries:
        raise UserError(f"{post} attributes {len(a['scores'])} targets but LOGO scored {n_queries} queries; run both "
                        f"with the same num_attrib / targets")
    G = collapse(a["scores"], groups, how)
    save_tensors(Path(post) / GROUP_SCORES, dict(scores=G, group_sizes=groups.sizes()),
                 metadata=dict(groups=groups.names, aggregate=how))
    return G


def guda_seconds(post):
    """Unlearning (all groups) + scoring seconds of a GUDA run, from its per-target log."""
    rows = [json.loads(line) for line in (Path(post) / "attrib_log.jsonl").read_text().splitlines() if line.strip()]
    return float(rows[0].get("unlearn_seconds", np.nan)), float(sum(r["seconds"] for r in rows))


def evaluate(logs, jobs, methods, how):
    """(per-query rows, time rows) of every method against LOGO over the runs `jobs`."""
    from mucs.ranking import agreement

    rows, times = [], []
    for job in jobs:
        lf = Path(logs) / f"{job}--logo"
        check_finished(lf, "logo")
        cfg, groups = run_groups(lf)
        L, meta = load_logo(lf)
        true = L["scores"].double()
        for m in methods:
            post = Path(logs) / f"{job}--post_{m}"
            check_finished(post, "a")
            if m == "guda":
                used = C.load_saved(post / "config.yaml").groups
                if C.sections(dict(groups=used), "groups") != C.sections(cfg, "groups"):
                    raise UserError(f"{post} used other groups or score settings than {lf}; rerun one of them with "
                                    f"the other's groups.* settings")
            pred = method_groups(post, groups, "mean" if m == "guda" else how, len(true))  # GUDA's mean is exact
            for q, vals in enumerate(zip(*agreement(pred.numpy(), true.numpy()).values())):
                rows.append(dict(job=job, method=m, query=q, **dict(zip(METRIC_NAMES, vals))))
        logo_s = float(L["train_seconds"].sum()) + float(meta["score_seconds"])
        t = dict(job=job, groups=len(groups), queries=len(true), logo_train_s=float(L["train_seconds"].sum()),
                 logo_score_s=float(meta["score_seconds"]))
        if "guda" in methods:
            u, s = guda_seconds(Path(logs) / f"{job}--post_guda")
            t.update(guda_unlearn_s=u, guda_score_s=s, speedup=logo_s / (u + s))
        times.append(t)
    return pd.DataFrame(rows), pd.DataFrame(times)


METRIC_NAMES = ["top1", "mrr", "ndcg@3", "top3_overlap", "rbo", "spearman"]


def summarize(per_query):
    g = per_query.groupby("method", sort=False)
    out = g[METRIC_NAMES].mean()
    for c in METRIC_NAMES:
        out[f"{c}_se"] = g[c].std(ddof=1) / np.sqrt(g[c].count())
    out["n"] = g.size()
    return out.reset_index()


def format_summary(s):
    t = pd.DataFrame({"method": s.method})
    for c in METRIC_NAMES:
        t[c] = [f"{m:.3f} ± {e:.3f}" for m, e in zip(s[c], s[f"{c}_se"])]
    t["n"] = s.n
    return t.to_string(index=False)


def group_eval(plots, logs, jobs, methods, how, fn_out=None):
    """scripts/guda_eval.py: every method against LOGO over the runs `jobs`; tables in <plots>/<fn_out>/, printed."""
    per_query, times = evaluate(logs, jobs, methods, how)
    summary = summarize(per_query)
    out = Path(plots) / (fn_out or f"groups_{jobs[0]}" + (f"_x{len(jobs)}" if len(jobs) > 1 else ""))
    for name, df in (("group_per_query", per_query), ("group_summary", summary), ("group_times", times)):
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
    K = int(times.groups.iloc[0])
    print(f"\nGroup attribution against LOGO: {len(jobs)} run(s), {int(times.queries.sum())} queries, {K} groups "
          f"(chance Top-1 {1 / K:.3f}); instance methods aggregated by {how} (mean ± s.e. over queries)")
    print(format_summary(summary))
    print("\nWall time (seconds)")
    print(times.to_string(index=False, float_format="{:.1f}".format))
    if "speedup" in times:
        tot = (times.logo_train_s.sum() + times.logo_score_s.sum()) / (times.guda_unlearn_s.sum() + times.guda_score_s.sum())
        print(f"GUDA speed-up over LOGO retraining: {tot:.1f}x")
    print(f"\n[guda_eval] tables in {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Choosing GUDA's settings on a run without LOGO models


def sweep(job):
    """Per gpre sample (targets, then controls): GUDA's group scores [N, K] under job.cfg.attrib, the sample's own
    group (the group of its class), the unlearning seconds and the number of targets."""
    from mucs.attrib.guda import GUDA, unlearn_seconds

    check_finished(job.pre, "gpre")
    s = load_samples(job.pre)
    classes = torch.unique(job.train_split.labels)  # load_groups numbers label groups in class order
    if job.cfg.groups.source != "label" or "cond" not in s or not torch.isin(s["labels"], classes).all():
        raise UserError("the label proxy needs class-conditional samples of a job whose groups are its classes "
                        "(groups.source=label)")
    with scoring(job.cfg):
        m = GUDA(job.cfg.attrib, attrib_context(job))
        G = m.group_scores(s["images"], s["cond"])
    return G, torch.searchsorted(classes, s["labels"]), unlearn_seconds(m.paths), int(s["num_attrib"])


def sweep_variants(variants, fn_out=None):
    """scripts/guda_sweep.py: the label proxy (and LOGO's Top-1 and MRR where it is done) of each variant, a
    (name, config) pair; the table in <plots>/<fn_out>/guda_sweep.csv, printed."""
    from mucs.ranking import agreement

    rows = []
    for name, cfg in variants:
        job = Job(cfg)
        G, own, unlearn_s, n = sweep(job)
        rank = 1 + (G > G.gather(1, own[:, None])).sum(1).double()
        hit = (G.argmax(1) == own).double()
        row = dict(variant=name or "(defaults)", own_top1_targets=hit[:n].mean().item(),
                   own_rank_targets=rank[:n].mean().item(), own_top1_controls=hit[n:].mean().item(),
                   own_rank_controls=rank[n:].mean().item(), own_top1_all=hit.mean().item(), unlearn_s=unlearn_s)
        lf = logo_dir(job.cfg)
        logo_cfg = C.load_saved(lf / "config.yaml") if (lf / LOGO).exists() else None
        if logo_cfg is not None and C.sections(logo_cfg, "groups") == C.sections(job.cfg, "groups"):
            a = agreement(G[:n].numpy(), load_logo(lf)[0]["scores"].numpy())
            row.update(logo_top1=float(np.mean(a["top1"])), logo_mrr=float(np.mean(a["mrr"])))
        rows.append(row)
        print(f"[guda_sweep] {row['variant']}: own class first for {row['own_top1_all']:.3f} of {len(G)} samples",
              flush=True)
    table = pd.DataFrame(rows)
    out = Path(job.cfg.paths.plots) / (fn_out or f"guda_sweep_{C.run_name(job.cfg)}")
    with atomic_path(out / "guda_sweep.csv") as tmp:
        table.to_csv(tmp, index=False)
    print(f"\nGUDA variants on {C.run_name(job.cfg)} ({G.shape[1]} groups, chance {1 / G.shape[1]:.3f}); LOGO columns "
          f"where {lf.name} is done with the same groups.* settings")
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"\n[guda_sweep] table in {out}")
    return 0


add(Stage("logo", run_logo, (LOGO,), logo_inputs,
          TRAINED + ("groups", "sample", "num_attrib", "control_factor", "targets", "use_last_ckpt") + MADE + SCORED,
          kind="logo", sharded=True, data_parallel=True, clear=clear_logo,
          units=lambda j: group_units(len(load_groups(j.cfg.groups, j.train_split, j.meta)))))
