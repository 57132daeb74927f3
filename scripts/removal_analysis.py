"""What the methods' removals are, on finished digits runs (the analysis of docs/results.md, "Why the controls move").

Per seed: items removed; share of each sample's class removed, share of its 10 nearest training items (pixel
distance to the pre image) removed, and its post similarity (targets, controls);
how target-specific the scores are (mean pairwise Spearman between targets' score vectors, share of top
entries in >= 3 targets' lists); how typical the removed items are (mean distance to their 10 nearest
training neighbours, share in the densest quartile).
Usage: python scripts/removal_analysis.py [--methods=random,pixel,mucs] [--seeds=1,2,3] [key=value ...]
"""
import sys

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from mucs import config as C, stages as S
from mucs.attrib.base import load_attrib
from mucs.cli import Parser, guard, parse_list
from mucs.errors import UserError
from mucs.io import load_tensors


def main(argv):
    ap = Parser(prog="removal_analysis.py", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="random,pixel,mucs")
    ap.add_argument("--seeds", default="1,2,3")
    args, over = ap.parse_overrides(argv)
    methods = parse_list(args.methods, "methods", C.options("attrib"))
    cfgs = {seed: C.compose(over + [f"seed={seed}"]) for seed in parse_list(args.seeds, "seeds")}  # checked first
    rows, spec = [], []
    for seed, cfg in cfgs.items():
        job = S.Job(cfg)
        tr = job.train_split
        lab, ids = tr.labels.numpy(), tr.ids.numpy()
        X = tr.float_images().flatten(1)
        dist = torch.cdist(X, X).fill_diagonal_(float("inf"))
        knn = dist.topk(10, largest=False).values.mean(1).numpy()  # small: a dense neighbourhood
        pre = load_tensors(job.pre / "samples.safetensors")
        na, slab = int(pre["num_attrib"]), pre["labels"].numpy()
        near = torch.cdist(pre["images"].flatten(1), X).topk(10, largest=False).indices.numpy()  # [samples, 10]
        for m in methods:
            post = C.post_dir(job.cfg, m)
            a = load_attrib(post)
            top = a["top_ids"].numpy()
            removed = np.isin(ids, np.unique(top))  # what tpost removed (Job.removed_ids)
            share = np.bincount(lab[removed], minlength=lab.max() + 1) / np.bincount(lab)
            if not (post / "eval-sims.csv").exists():
                raise UserError(f"no {post / 'eval-sims.csv'}; run eval.py on this job with --methods=random,{m} first")
            sims = pd.read_csv(post / "eval-sims.csv").set_index("sample")
            rows += [dict(seed=seed, method=m, control=i >= na, class_share=share[slab[i]],
                          near_share=removed[near[i]].mean(), ssim=sims.loc[i, "ssim"], feat=sims.loc[i, "feat"])
                     for i in range(len(slab))]
            r = spearmanr(a["scores"].numpy().T).correlation
            u, c = np.unique(top, return_counts=True)
            spec.append(dict(seed=seed, method=m, removed=int(removed.sum()),
                             pairwise_rho=r[np.triu_indices(len(top), 1)].mean(),
                             top_in_3_lists=np.isin(top, u[c >= 3]).mean(), max_lists=int(c.max()),
                             knn=knn[removed].mean(), knn_all=knn.mean(),
                             dense_quartile=np.mean(knn[removed] <= np.quantile(knn, 0.25))))
    df = pd.DataFrame(rows)
    print(pd.DataFrame(spec).round(3).to_string(index=False))
    print(df.groupby(["method", "control"])[["class_share", "near_share", "ssim", "feat"]].mean().round(4))
    for m, c in df[df.control].groupby("method"):
        print(f"{m}: controls' corr(class_share, ssim) = {c.class_share.corr(c.ssim):.3f}, "
              f"corr(near_share, ssim) = {c.near_share.corr(c.ssim):.3f}")


if __name__ == "__main__":
    sys.exit(guard(main)())
