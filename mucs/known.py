"""Known-answer evaluation: attribution where the right answer is known, for every registered method.

Stage `known` (pipeline.py --what=known; settings in configs/known/), run folder <run>--known/:
  copies/      K training items (a seeded draw, or known.copies.ids) given back as targets, as they are and under
               each corruption level (Gaussian noise of std sigma, a shift by k pixels, a JPEG round trip at
               quality q through Pillow), attributed with the pre model. The answer: the item, with any exact duplicate of it.
  custom<e>/   customization, the AbC protocol (Wang et al. 2023, "Evaluating Data Attribution for Text-to-Image
               Models"): the pre model fine-tuned with the training recipe for known.custom.steps updates on the
               training split plus exemplar e (a held-out test item, or the user's image; a share known.custom.share
               of the fine-tune set), num_samples samples of it (per-sample seeds, the exemplar's class), and the
               exemplar (id -1) added to the candidates; each method ranks them for each sample with the
               customized model. The answer: the exemplar.
Each case holds one folder per method with its attribution parts, one per target (resumable); `--shard i/n` scores
blocks i, i+n, ... of the copies and customizes exemplars i, i+n, ...; `-1/n` (or an unsplit run) merges them into
  known-ranks.csv   per method and target the answer's rank among the candidates (0: first; ties count against
                    the method: mucs.stats.known_rank)
  known-log.jsonl   the same rows with each method's per-target log (MUCS: the unlearning's stop reason and steps,
                    and the score's term per noise level for the answer and for the top-scored item)
  known-methods.json  the methods that ran and those skipped, with the reason.
`eval.py --known` pools runs into recall@1, @10, @1% and MRR per method with bootstrap intervals (`table`).
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf, open_dict

from mucs import config as C
from mucs import stats
from mucs.attrib.base import REGISTRY, Context, attribute, get_method, load_attrib, merge
from mucs.data import Split
from mucs.errors import UserError
from mucs.generate import SAMPLES, load_samples, load_user_targets, sample, save_samples
from mucs.io import atomic_path, write_json, write_text
from mucs.model import labels_of
from mucs.precision import scoring
from mucs.stages import MADE, SCORED, TRAINED, Stage, add, data_files, forget_parts
from mucs.train import STATE, step_generator, train

RANKS, LOG, METHODS = "known-ranks.csv", "known-log.jsonl", "known-methods.json"
EXEMPLAR_ID = -1  # the exemplar's id among a customization case's candidates
FINETUNED = "finetune.json"


def folder(job):
    return C.run_dir(job.cfg, "known")


# ---------------------------------------------------------------------------------------------
# Light corruptions


def variants(kc):
    """The variants of the given-back items: ("exact", 0), then each level of noise, shift and jpeg."""
    return [("exact", 0)] + [(kind, level) for kind in ("noise", "shift", "jpeg") for level in kc[kind]]


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def corrupt(x, kind, level, generator=None):
    """Images x [N, C, H, W] in [-1, 1] under one light corruption."""
    if kind == "exact":
        return x.clone()
    if kind == "noise":  # not clipped, so the RMS change is the level itself
        return x + float(level) * torch.randn(x.shape, generator=generator)
    if kind == "shift":  # right by k pixels; the k new columns repeat the left edge
        return torch.nn.functional.pad(x, (int(level), 0, 0, 0), mode="replicate")[..., : x.shape[-1]]
    if kind == "jpeg":  # a real JPEG round trip (Pillow's libjpeg), on the 8-bit image
        return torch.stack([jpeg(u, int(level)) for u in to_uint8(x)]).float() / 127.5 - 1
    raise UserError(f"unknown corruption {kind!r}; choose noise, shift or jpeg")


def jpeg(u, quality):
    """A uint8 image [C, H, W] encoded as JPEG at `quality` and decoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(u.permute(1, 2, 0).squeeze(-1).numpy()).save(buf, format="JPEG", quality=quality)
    out = torch.from_numpy(np.asarray(Image.open(buf)).copy())
    return out.reshape(u.shape[1], u.shape[2], -1).permute(2, 0, 1)


def duplicates(images, image):
    """Which of uint8 images [n, C, H, W] are byte for byte `image` [C, H, W]: the answer set of a known item."""
    return (images.flatten(1) == image.flatten()).all(1)


# ---------------------------------------------------------------------------------------------
# The cases: targets, candidates, answers


@dataclass
class Case:
    name: str
    x: torch.Tensor  # targets [T, C, H, W] in [-1, 1]
    labels: torch.Tensor  # their condition vectors [T, d] or None
    rows: list  # per target: what it is (kind, level, cluster, item id)
    answers: torch.Tensor  # bool [T, n]: the candidates that are the right answer
    pool: Split  # the candidates (the training split, + the exemplar)
    model_dir: Path  # the run folder of the model methods attribute with (its weights key their caches)


def copies_case(job):
    """Every variant of the K given-back items (variant-major), attributed with the pre model."""
    kc, tr = job.cfg.known.copies, job.train_split
    if kc.ids:
        ids = torch.tensor(list(kc.ids))
        unknown = ids[~torch.isin(ids, tr.ids)]
        if len(unknown):
            raise UserError(f"known.copies.ids {unknown[:5].tolist()} are not in the training split; give training ids")
        pos = torch.nonzero(ids[:, None] == tr.ids[None]).T[1]
    else:
        pos = torch.randperm(len(tr), generator=torch.Generator().manual_seed(int(kc.item_seed)))[: int(kc.num_items)]
    items = tr.subset(pos)
    x0, y0 = items.float_images(), labels_of(items, job.cfg.model, job.meta)
    answer = torch.stack([duplicates(tr.images, im) for im in items.images])
    xs, rows = [], []
    for v, (kind, level) in enumerate(variants(kc)):
        xs.append(corrupt(x0, kind, level, step_generator(kc.item_seed, v, stream=31)))
        rows += [dict(case="copies", kind=kind, level=level, cluster=f"item{int(i)}", item=int(i)) for i in items.ids]
    V = len(xs)
    return Case("copies", torch.cat(xs), None if y0 is None else y0.repeat(V, 1), rows, answer.repeat(V, 1), tr,
                job.pre)


def exemplars(job):
    """The exemplars, a Split: held-out test items drawn by exemplar_seed, or the user's images (class `label`)."""
    cc = job.cfg.known.custom
    if cc.images:
        x = load_user_targets(cc.images, job.meta)
        return Split(to_uint8(x), torch.full((len(x),), EXEMPLAR_ID), torch.full((len(x),), int(cc.label)))
    te = job.test_split
    pick = torch.randperm(len(te), generator=torch.Generator().manual_seed(int(cc.exemplar_seed)))
    return te.subset(pick[: int(cc.num_exemplars)])


def with_exemplar(train_split, ex, copies=1):
    """The training split followed by `copies` copies of the one-item Split `ex`, each with id EXEMPLAR_ID."""
    if (train_split.conds is None) != (ex.conds is None):
        raise UserError("the exemplar has no caption but the training items have (or the reverse); give exemplars "
                        "of the dataset's kind")
    rep = lambda t: None if t is None else t.expand(copies, *t.shape[1:])  # noqa: E731
    cat = lambda a, b: None if a is None else torch.cat([a, rep(b)])  # noqa: E731
    return Split(cat(train_split.images, ex.images), cat(train_split.ids, torch.tensor([EXEMPLAR_ID])),
                 cat(train_split.labels, ex.labels), cat(train_split.conds, ex.conds),
                 cat(train_split.conds_count, ex.conds_count))


def finetune_copies(n, share):
    """Copies of the exemplar that make it a share `share` of a fine-tune set with n training items (at least 1)."""
    return max(1, round(float(share) * n / (1 - float(share))))


def custom_dir(job, e):
    return folder(job) / f"custom{e:03d}"


def customize(job, e, ex):
    """Exemplar e's customized model (the pre model fine-tuned with the training recipe on the training split plus
    the exemplar) and its samples, in custom<e>/; each part resumes, and is skipped once done."""
    cc, d = job.cfg.known.custom, custom_dir(job, e)
    if not (d / FINETUNED).exists():
        tr = job.train_split
        recipe = {"steps": int(cc.steps), "epoch_steps": int(cc.steps)}  # one validation, at the end: best = last
        if cc.ema is not None:
            recipe["ema"] = float(cc.ema)
        cfg, k = OmegaConf.merge(job.cfg, {"train": recipe}), finetune_copies(len(tr), cc.share)
        out = train(cfg, with_exemplar(tr, ex, k), job.test_split, job.meta, d, job.device, desc=f"known custom{e}",
                    init=job.weights(job.pre))
        write_json(d / FINETUNED, dict(exemplar_id=int(ex.ids[0]), label=int(ex.labels[0]), copies=k,
                                       training_items=len(tr), **out))
        (d / STATE).unlink(missing_ok=True)
    if not (d / SAMPLES).exists():
        S = int(cc.num_samples)
        y = labels_of(ex, job.cfg.model, job.meta)
        y = None if y is None else y.expand(S, -1)
        seeds = [int(cc.sample_seed) + s for s in range(S)]
        x = sample(job.denoiser(d), job.cfg, seeds, y, tuple(ex.images.shape[1:]), job.device, desc=f"known custom{e}",
                   parts=d / "gen-parts")
        save_samples(d, x, torch.tensor(seeds), ex.labels.expand(S), y, S)
        shutil.rmtree(d / "gen-parts", ignore_errors=True)


def custom_case(job, e, ex):
    """Exemplar e's samples as targets, among the training items plus the exemplar (customize() made them)."""
    d = custom_dir(job, e)
    if not (d / SAMPLES).exists():
        raise UserError(f"the customization of exemplar {e} is not done in {d}; run its shard (--what=known --shard "
                        f"{e}/n) or --what=known without --shard first")
    s, pool = load_samples(d), with_exemplar(job.train_split, ex)
    answer = duplicates(pool.images, ex.images[0])
    rows = [dict(case="custom", kind="custom", level=0, cluster=f"exemplar{e}", item=int(ex.ids[0]), sample=k)
            for k in range(len(s["images"]))]
    return Case(d.name, s["images"], s.get("cond"), rows, answer.expand(len(rows), -1), pool, d)


# ---------------------------------------------------------------------------------------------
# The methods


def method_cfg(cfg, name):
    """The job's config with method `name`'s section: its configs/attrib/<name>.yaml (a job preset's scaling under
    job_attrib applied), or for the method of --attrib its section with the command line's attrib.* values."""
    if name == cfg.attrib.name:
        return cfg
    c = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(c):
        c.attrib = OmegaConf.load(C.CONFIGS / "attrib" / f"{name}.yaml")
    OmegaConf.resolve(c)
    return c


def methods_of(job):
    """({method: its config} to run, {method: why it is skipped}) for known.methods."""
    names = C.options("attrib") if job.cfg.known.methods == "all" else list(job.cfg.known.methods)
    cfgs = {m: method_cfg(job.cfg, m) for m in names}
    skipped = {m: f"no method file registers {m!r}" if m not in REGISTRY else get_method(m).missing(cfgs[m])
               for m in names}
    skipped = {m: why for m, why in skipped.items() if why}
    if "ensemble" in cfgs and "ensemble" not in skipped:  # it combines its methods' scores of these targets
        absent = [o for o in cfgs["ensemble"].attrib.methods if o not in cfgs or o in skipped]
        if absent:
            skipped["ensemble"] = f"it combines {', '.join(absent)}, which do(es) not run here"
    return {m: c for m, c in cfgs.items() if m not in skipped}, skipped


def attribute_case(job, case, methods, shard):
    D = job.denoiser(case.model_dir)
    explain = {t: int(torch.nonzero(a)[0]) for t, a in enumerate(case.answers)}  # each target's answer (a row)
    for m, cfg in methods.items():
        if m == "ensemble":
            continue
        ctx = Context(cfg, D, case.pool, job.meta, job.device, case.model_dir, folder(job) / case.name / m,
                      extra=dict(explain=explain))
        with scoring(job.cfg):
            attribute(get_method(m)(cfg.attrib, ctx), case.x, case.labels, ctx.work_dir, shard)


# ---------------------------------------------------------------------------------------------
# The stage


def run(job, shard=(0, 1)):
    write_text(folder(job) / "config.yaml", C.to_yaml(job.cfg))
    methods, skipped = methods_of(job)
    for m, why in skipped.items():
        print(f"[known] skipping {m}: {why}")
    ex, kc = exemplars(job), job.cfg.known.copies
    copies = [copies_case(job)] if kc.num_items or kc.ids else []
    if shard[0] != -1:
        for case in copies:
            attribute_case(job, case, methods, shard)
        for e in range(shard[0], len(ex), shard[1]):
            customize(job, e, ex.subset([e]))
            attribute_case(job, custom_case(job, e, ex.subset([e])), methods, (0, 1))
    if shard[1] == 1 or shard[0] == -1:
        ranks(job, copies + [custom_case(job, e, ex.subset([e])) for e in range(len(ex))], methods, skipped)


def merged_scores(job, case, m, cfg, done):
    """Method m's scores [T, n] of the case from its parts (ensemble: its methods' normalised scores combined)."""
    if m == "ensemble":
        from mucs.attrib.ensemble import normalise
        a = cfg.attrib
        w = list(a.weights) if a.weights is not None else [1.0] * len(a.methods)
        return sum(float(wi) * normalise(done[o], a.mode) for o, wi in zip(a.methods, w)) / sum(map(float, w)), []
    work = folder(job) / case.name / m
    missing = merge(work, len(case.x), case.pool.ids, min(C.num_removal(job.cfg), len(case.pool)))
    if missing:
        raise UserError(f"{m}'s attribution of {case.name} targets {missing[:10]} is missing in {work}; run their "
                        f"shards first (--what=known --shard i/n)")
    logs = [json.loads(line) for line in (work / "attrib_log.jsonl").read_text().splitlines()]
    return load_attrib(work)["scores"], logs


def ranks(job, cases, methods, skipped):
    """known-ranks.csv, known-log.jsonl and known-methods.json from the merged scores of every case and method."""
    rows, logs = [], []
    for case in cases:
        done = {}
        for m in sorted(methods, key=lambda m: m == "ensemble"):  # the ensemble after the methods it combines
            done[m], log = merged_scores(job, case, m, methods[m], done)
            for t, row in enumerate(case.rows):
                s = done[m][t]
                r = dict(row, method=m, rank=stats.known_rank(s, case.answers[t]), candidates=len(case.pool),
                         top_id=int(case.pool.ids[int(s.argmax())]))
                rows.append(r)
                logs.append(dict(r, **(log[t] if log else {})))
    d = folder(job)
    with atomic_path(d / RANKS) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    write_text(d / LOG, "".join(json.dumps(r, sort_keys=True) + "\n" for r in logs))
    write_json(d / METHODS, dict(ran=sorted(methods), skipped=skipped))
    table = pd.DataFrame(rows).groupby(["method", "kind", "level"], sort=False)["rank"]
    print(f"[known] answer ranked first (share of targets) per method and case:\n"
          f"{table.apply(lambda r: (r == 0).mean()).unstack([1, 2]).to_string(float_format='{:.2f}'.format)}")


def clear(job, shard=(0, 1)):
    """--force: forget this shard's copy parts and its exemplars' customization; -1/n forgets nothing."""
    if shard[0] == -1:
        return
    for m in C.options("attrib"):
        if m in REGISTRY:
            forget_parts(folder(job) / "copies" / m, m, shard)
    for d in folder(job).glob("custom*"):
        if int(d.name[len("custom"):]) % shard[1] == shard[0]:
            shutil.rmtree(d, ignore_errors=True)


def units(job):
    kc, cc = job.cfg.known.copies, job.cfg.known.custom
    T = (len(kc.ids) if kc.ids else int(kc.num_items)) * len(variants(kc))
    E = "user exemplars" if cc.images else f"{cc.num_exemplars} exemplars"
    return (None if cc.images else max(T, int(cc.num_exemplars))), f"known: {T} given-back targets, {E}"


add(Stage("known", run, (RANKS, LOG), lambda j: [(j.weights(j.pre), "tpre")] + data_files(j),
          TRAINED + ("known", "attrib", "groups", "sample", "topk_factor", "num_removal", "use_last_ckpt") + MADE
          + SCORED, kind="known", sharded=True, clear=clear, units=units))


# ---------------------------------------------------------------------------------------------
# eval.py --known: the table over runs


STATS = ("recall@1", "recall@10", "recall@1%", "mrr")


def table(per_target, B=1000):
    """One row per (method, kind, level): targets, clusters (items or exemplars), median rank, and each of STATS
    with its 95% bootstrap interval over the clusters (the exemplar's samples resampled together)."""
    out = []
    for (m, kind, level), g in per_target.groupby(["method", "kind", "level"], sort=False):
        clusters = (g.job + ":" + g.cluster).values
        row = dict(method=m, kind=kind, level=level, targets=len(g), clusters=len(set(clusters)),
                   median_rank=float(g["rank"].median()))
        for k, (mean, lo, hi) in stats.known_summary(g["rank"].values, g.candidates.values, clusters, B).items():
            row.update({k: mean, f"{k}_lo": lo, f"{k}_hi": hi})
        out.append(row)
    return pd.DataFrame(out)


def format_table(t):
    f = pd.DataFrame({"method": t.method, "case": [k if k in ("exact", "custom") else f"{k} {v:g}" for k, v in
                                                    zip(t.kind, t.level)], "n": t.targets})
    for k in STATS:
        f[k] = [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in zip(t[k], t[f"{k}_lo"], t[f"{k}_hi"])]
    f["median rank"] = t.median_rank.map("{:g}".format)
    return f


def misses(logs):
    """The targets a method missed (answer not first), with what its log says about them: scalar entries (MUCS:
    stop, steps, L_gen, L_null) and, where it logs per-noise terms, the noise levels at which the answer's term
    fell below the top-scored item's."""
    out = []
    for r in logs:
        if r["rank"] == 0:
            continue
        row = {k: v for k, v in r.items() if np.isscalar(v) and k not in ("seconds",)}
        pn = r.get("per_noise")
        if pn:
            row["behind_at_sigma"] = " ".join(f"{s:.3g}" for s, a, b in zip(pn["sigma"], pn["answer"], pn["top"])
                                              if a < b)
            row["answer_term"], row["top_term"] = float(np.mean(pn["answer"])), float(np.mean(pn["top"]))
        out.append(row)
    return pd.DataFrame(out)


def known_eval(jobs, logs, out, methods=None, plots=True, B=1000):
    """Pool <run>--known/ of the runs `jobs` in `logs`: known.csv (the table), known_targets.csv (every target's
    rank), known_misses.csv and known_ranks.png in `out`; prints the table. Returns the table."""
    from mucs.manifest import check_finished

    frames, logged, skipped = [], [], {}
    for job in jobs:
        d = Path(logs) / f"{job}--known"
        check_finished(d, "known")
        frames.append(pd.read_csv(d / RANKS).assign(job=job))
        logged += [dict(r, job=job) for r in map(json.loads, (d / LOG).read_text().splitlines())]
        skipped.update(json.loads((d / METHODS).read_text())["skipped"])
    per = pd.concat(frames, ignore_index=True)
    if methods:
        per = per[per.method.isin(methods)]
        logged = [r for r in logged if r["method"] in methods]
    t = table(per, B)
    out = Path(out)
    for name, df in (("known", t), ("known_targets", per), ("known_misses", misses(logged))):
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
    if plots:
        from mucs.plots import rank_curves
        rank_curves(per, out / "known_ranks.png")
    print(f"\nKnown-answer evaluation: {len(jobs)} run(s); rank 0 = the answer first, ties against the method; "
          f"95% bootstrap intervals over items (exemplars for custom)")
    print(format_table(t).to_string(index=False))
    for m, why in skipped.items():
        print(f"skipped {m}: {why}")
    print(f"\n[eval] known-answer tables and plot in {out}")
    return t
