"""Linear datamodeling score (LDS; Park et al. 2023, the benchmark of D-TRAK, DAS and dattri).

  1. M random subsets S_i of a fraction alpha of the training split (seeded by lds.subset_seed), S models
     per subset, each a resumable training of its own in <job>_s<seed>_sb<subsample>--lds-models/m<i>_s<j>/
     (seed: the job's seed + j).
  2. Every query x (gpre's targets, the images the methods attributed) measured under every model with one
     fixed set of K (sigma, noise) pairs, the same for all queries and models:
         f(x; S_i) = - mean_k L(x; sigma_k, eps_k),   averaged over the S seeds of subset i.
  3. For a method's scores tau(x, j) (higher = j more responsible for x) the linear datamodel predicts
         g(x; S_i) = sum_{j in S_i} tau(x, j);
     LDS(x) = Spearman_i(g(x; S_i), f(x; S_i)), averaged over queries, with a bootstrap interval over them.

The measured output is MINUS the loss (higher = x more likely under the model), the D-TRAK convention for
scores where a high tau(x, j) means "training on j makes x likely": a method that predicts which subsets fit
x best scores LDS near 1, random scores near 0. `--shard i/n` trains and measures units k = i, i+n, ... of
the M*S (subset, seed) units; `-1/n` only merges them (as for the attribution stage `a`).

The subset models are shared by the runs of the job that differ only in their queries (num_attrib, topk_factor),
each with its training key, and each query set's outputs are cached next to a model: an LDS grows to more subsets
or seeds (the stage's extent, Stage.extent) or to more queries (a run with a larger num_attrib) without training
any finished model again.
"""
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mucs import config as C
from mucs.errors import UserError
from mucs.generate import SAMPLES
from mucs.io import (atomic_path, digest, file_hash, load_tensor_metadata, load_tensors, read_json, save_tensors,
                     write_json)
from mucs.precision import numerics, scoring
from mucs.stats import bootstrap
from mucs.stages import MADE, SCORED, TRAINED, Stage, add, data_files, targets_of

OUTPUTS = "lds-outputs.safetensors"  # the stage's output: measured f [M, S, Q], subsets [M, n], train_ids
UNIT_OUTPUT = "lds-output.safetensors"  # a unit's f [Q] in the layout before models were shared (<run>--lds/m<i>_s<j>/)
MODEL = "lds-model.json"  # a unit's finished model: its training key and the hash of its last weights
TABLE, PER_QUERY = "lds.csv", "lds_per_query.csv"


def folder(job):
    return C.run_dir(job.cfg, "lds")


def models_folder(job):
    c = job.cfg
    return Path(c.paths.logs) / f"{c.job_name}_s{c.seed}_sb{c.subsample}--lds-models"


# ---------------------------------------------------------------------------------------------
# The maths


def draw_subsets(n, alpha, M, seed):
    """M random subsets of round(alpha n) of n items, as a bool mask [M, n]; subset i depends on (seed, i) only."""
    from mucs.train import step_generator

    k = int(round(float(alpha) * n))
    if not 0 < k < n or int(M) < 2:
        raise UserError(f"lds needs 0 < alpha < 1 with at least one item in and out of each subset and at least 2 "
                        f"subsets (alpha {alpha} of {n} items gives {k}; num_subsets {M})")
    masks = torch.zeros(int(M), n, dtype=torch.bool)
    for i in range(int(M)):
        masks[i, torch.randperm(n, generator=step_generator(seed, i, stream=11))[:k]] = True
    return masks


def spearman_rows(a, b):
    """Spearman correlation of each row of a with the same row of b ([Q, M] each, average ranks for ties);
    NaN where a row is constant (it ranks nothing)."""
    from scipy.stats import rankdata

    ra, rb = (rankdata(np.asarray(v, dtype=float), axis=1) for v in (a, b))
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def lds_per_query(tau, masks, f):
    """LDS of each query: tau [Q, n] scores, masks [M, n] subsets, f [M, Q] measured outputs -> [Q]."""
    g = torch.as_tensor(tau).double() @ torch.as_tensor(masks).double().T  # g(x; S_i) = sum_{j in S_i} tau(x, j)
    return spearman_rows(g.numpy(), torch.as_tensor(f).double().T.numpy())


# ---------------------------------------------------------------------------------------------
# The stage: train the (subset, seed) units, measure the queries under each, merge


def units(cfg):
    return [(i, j) for i in range(int(cfg.lds.num_subsets)) for j in range(int(cfg.lds.num_seeds))]


def unit_dir(job, i, j):
    return models_folder(job) / f"m{i}_s{j}"


def unit_output(job, i, j, key):
    """Unit (i, j)'s f [Q] of the query set `key`."""
    return unit_dir(job, i, j) / f"lds-output-{key}.safetensors"


def model_key(cfg, split):
    """What a subset model is: the model and recipe settings, its seed, its training items and the precision it is
    trained with (settings, not the device: a model trained on a GPU is measured on a CPU as it is)."""
    return C.hash_settings(dict(C.sections(cfg, "model", "train", "seed", *MADE), ids=split.ids.tolist()))


def adopt(job, i, j):
    """A unit finished in the layout before models were shared (<run>--lds/m<i>_s<j>/, its output made from its last
    weights) moves into the shared models folder instead of being trained again."""
    old, new = folder(job) / f"m{i}_s{j}", unit_dir(job, i, j)
    if new.exists() or not (old / UNIT_OUTPUT).exists() or not job.weights(old).exists():
        return False
    meta = load_tensor_metadata(old / UNIT_OUTPUT)
    if meta.get("weights") != file_hash(job.weights(old)):
        return False
    new.parent.mkdir(parents=True, exist_ok=True)
    old.rename(new)
    (new / UNIT_OUTPUT).rename(new / f"lds-output-{meta.get('key')}.safetensors")  # its query set's measurement
    print(f"[lds] unit m{i}_s{j}: its model moved from {old} to {new}")
    return True


def subsets(job):
    return draw_subsets(len(job.train_split), job.cfg.lds.alpha, job.cfg.lds.num_subsets, job.cfg.lds.subset_seed)


def queries(job):
    """The images the methods attributed (gpre's targets) and their conditions."""
    if job.cfg.targets:
        raise UserError("lds measures gpre's targets (the methods' scores are for them); drop targets=...")
    return targets_of(job)


def subset_cfg(cfg, j):
    """The config a unit trains with: seed + j, and lds.steps updates when set."""
    from omegaconf import OmegaConf

    c = OmegaConf.merge(cfg, {"seed": int(cfg.seed) + j})
    if cfg.lds.steps is not None:
        c.train.steps = int(cfg.lds.steps)
    return c


def noise_set(job, D, shape):
    """lds's fixed set of (sigma, noise) pairs: levels on its t_range of the sampler's ladder (D's)."""
    from mucs.attrib.common import ladder_noise

    lc = job.cfg.lds
    return ladder_noise(SimpleNamespace(cfg=job.cfg, D=D, device=job.device), lc.num_noises, lc.t_range,
                        lc.noise_seed, shape)


def measure(job, D, x, y, noise=None):
    """f(x) = - mean_k L(x; sigma_k, eps_k) over the fixed noise set of lds, with the precision of scores."""
    from mucs.attrib.mucs import item_noise_losses

    sigmas, E = noise or noise_set(job, D, x.shape[1:])
    dev = job.device
    with scoring(job.cfg):
        L = item_noise_losses(D, x.to(dev), None if y is None else y.to(dev), sigmas, E, int(job.cfg.lds.eval_batch))
    return -L.double().mean(1)


def run_unit(job, i, j, masks, x, y, key, noise):
    """Train unit (i, j) once (resuming), then measure the queries under it; the measurement is cached next to the
    model against the query set `key`, the model's weights and the numerics of the measurement (a unit measured
    under other numerics is measured again)."""
    from mucs.lock import FolderLock
    from mucs.model import load_denoiser
    from mucs.train import STATE, train

    d = unit_dir(job, i, j)
    cfg, sub = subset_cfg(job.cfg, j), job.train_split.subset(torch.nonzero(masks[i]).squeeze(1))
    last, trained_as = d / "model-last.safetensors", model_key(cfg, sub)
    with FolderLock(d.parent, job.cfg.get("lock_wait", 0), what=f"LDS model m{i}_s{j}", name=f".lock-m{i}_s{j}"):
        if adopt(job, i, j):
            write_json(d / MODEL, dict(train=trained_as, last=file_hash(last)))
        mark = read_json(d / MODEL) if (d / MODEL).exists() else None
        if mark and mark["train"] != trained_as:
            raise UserError(f"LDS model {d} was trained with other settings or items; pass the same settings, or "
                            f"redo the LDS models with --what=lds --force")
        if not (mark and last.exists() and mark["last"] == file_hash(last)):
            train(cfg, sub, job.test_split, job.meta, d, job.device, desc=f"lds m{i}_s{j}")
            write_json(d / MODEL, dict(train=trained_as, last=file_hash(last)))
            (d / STATE).unlink(missing_ok=True)  # done: its 4x-weights resume state would fill a disk at 64 x 3 models
        with scoring(job.cfg):
            now = numerics(job.device)
        path, weights = unit_output(job, i, j, key), file_hash(job.weights(d))
        meta = load_tensor_metadata(path) if path.exists() else {}
        if (meta.get("weights"), meta.get("numerics")) == (weights, now):
            return
        D = load_denoiser(job.cfg.model, job.meta, job.weights(d), job.device)
        save_tensors(path, dict(f=measure(job, D, x, y, noise).float()),
                     metadata=dict(key=key, weights=weights, numerics=now))


def run(job, shard=(0, 1)):
    """The lds stage: this shard's units, then (unsplit, or -1/n) the merged outputs and the table."""
    from mucs.model import build_denoiser

    x, y = queries(job)
    masks = subsets(job)
    noise = noise_set(job, build_denoiser(job.cfg.model, job.meta), x.shape[1:])  # the model only for its ladder
    key = digest(x, "none" if y is None else y, *noise)
    if shard[0] != -1:
        mine = units(job.cfg)[shard[0]::shard[1]]
        for n, (i, j) in enumerate(mine):
            print(f"[lds] unit m{i}_s{j} ({n + 1} of {len(mine)} in this shard)")
            run_unit(job, i, j, masks, x, y, key, noise)
    if shard[1] == 1 or shard[0] == -1:
        merge(job, masks, key, len(x))
        show(job)


def merge(job, masks, key, Q):
    M, S = int(job.cfg.lds.num_subsets), int(job.cfg.lds.num_seeds)
    f = torch.empty(M, S, Q)
    missing, made = [], {}
    for i, j in units(job.cfg):
        path = unit_output(job, i, j, key)
        t = load_tensors(path, what="LDS unit output") if path.exists() else None
        meta = load_tensor_metadata(path) if t is not None else {}
        if meta.get("key") != key:
            missing.append(f"m{i}_s{j}")
            continue
        f[i, j] = t["f"]
        made[f"m{i}_s{j}"] = meta.get("numerics")
    if missing:
        raise UserError(f"LDS units {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} are not measured "
                        f"yet in {models_folder(job)}; run their shards first (--what=lds --shard i/n)")
    first = next(iter(made.values()))
    other = [u for u, m in made.items() if m != first]
    if other:
        raise UserError(f"LDS units {', '.join(other[:8])} in {models_folder(job)} were measured under other numerics "
                        f"({'; '.join(C.differences(first, made[other[0]]))}); measurements of different numerics "
                        f"are not combined: rerun their shards on one kind of device")
    save_tensors(folder(job) / OUTPUTS, dict(f=f, subsets=masks.to(torch.uint8), train_ids=job.train_split.ids),
                 metadata=dict(key=key))


def clear(job, shard=(0, 1)):
    """--force: forget this shard's units (their models and outputs, also those of the job's other runs); the merge
    step (-1/n) forgets nothing."""
    if shard[0] == -1:
        return
    for i, j in units(job.cfg)[shard[0]::shard[1]]:
        shutil.rmtree(unit_dir(job, i, j), ignore_errors=True)
        shutil.rmtree(folder(job) / f"m{i}_s{j}", ignore_errors=True)  # the layout before models were shared


# ---------------------------------------------------------------------------------------------
# Scores of every attributed method, and the table


def method_scores(job, Q):
    """{method: scores [Q, n]} of every post folder of this run whose finished attribution ranks this training
    split for the current gpre targets; the others are named with the reason they are left out."""
    from mucs.attrib.base import ATTRIB, load_attrib

    samples, out = job.pre / SAMPLES, {}
    for d in sorted(Path(job.cfg.paths.logs).glob(f"{C.run_name(job.cfg)}--post_*")):
        m, manifest = d.name.split("--post_", 1)[1], d / "a.manifest.json"
        if not (d / ATTRIB).exists() or not manifest.exists():
            continue
        rec = read_json(manifest)
        hashes = [h for p, h in rec.get("inputs", {}).items() if Path(p).name == SAMPLES and Path(p).parent.name == job.pre.name]
        a = load_attrib(d)
        why = ("it attributes the user's own targets" if rec.get("settings", {}).get("targets") else
               "it attributes other gpre samples (redo it with --what=a --force)" if hashes != [file_hash(samples)] else
               "it ranks another training split" if not torch.equal(a["train_ids"], job.train_split.ids) else
               f"it has {a['scores'].shape[0]} targets, not {Q}" if a["scores"].shape[0] != Q else None)
        if why:
            print(f"[lds] leaving out {m}: {why}")
        else:
            out[m] = a["scores"]
    return out


def table(job):
    """(summary, per_query) DataFrames of every attributed method on the measured outputs."""
    import pandas as pd

    t = load_tensors(folder(job) / OUTPUTS, what="LDS outputs", hint="run --what=lds")
    f, masks = t["f"].double().mean(1), t["subsets"].bool()  # outputs averaged over the seeds of each subset
    M, S, Q = t["f"].shape
    rows, per = [], []
    for m, tau in method_scores(job, Q).items():
        v = lds_per_query(tau, masks, f)
        mean, lo, hi = bootstrap(v, job.cfg.lds.bootstrap, seed=0)
        rows.append(dict(method=m, lds=mean, lo=lo, hi=hi, queries=int(np.isfinite(v).sum()), subsets=M, seeds=S))
        per += [dict(method=m, query=q, lds=float(x)) for q, x in enumerate(v)]
    cols = ["method", "lds", "lo", "hi", "queries", "subsets", "seeds"]
    return pd.DataFrame(rows, columns=cols), pd.DataFrame(per, columns=["method", "query", "lds"])


def show(job):
    """Write lds.csv and lds_per_query.csv next to the outputs and print the table."""
    summary, per = table(job)
    for name, df in ((TABLE, summary), (PER_QUERY, per)):
        with atomic_path(folder(job) / name) as tmp:
            df.to_csv(tmp, index=False)
    if summary.empty:
        print(f"[lds] no method has attributed these targets yet (run --what=a --attrib=<m>); outputs in {folder(job)}")
        return summary
    print(f"\nLDS (Spearman across {summary.subsets.iloc[0]} subsets of summed scores vs minus the measured loss, "
          f"mean over queries, 95% bootstrap interval)")
    print(summary.to_string(index=False, float_format="{:.3f}".format))
    print(f"[lds] {folder(job) / TABLE}")
    return summary


add(Stage("lds", run, (OUTPUTS,), lambda j: [(j.pre / SAMPLES, "gpre")] + data_files(j),
          TRAINED + ("lds", "use_last_ckpt") + MADE + SCORED, kind="lds", sharded=True, clear=clear,
          units=lambda j: (len(units(j.cfg)), f"LDS trains {len(units(j.cfg))} models"),
          extent=("lds.num_subsets", "lds.num_seeds")))
