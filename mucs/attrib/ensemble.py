"""`ensemble`: combine the saved scores of other methods of the same job without recomputing them.

Each listed method's scores [T, n_train] are read from its own run folder (`<run>--post_<m>/attrib.safetensors`)
and normalised per target: `rank` maps them to average ranks in [0, 1] (1 = that method's top item), `zscore`
to (s - mean) / std. The ensemble score is their weighted mean.
"""
import torch
from scipy.stats import rankdata

from mucs.attrib.base import ATTRIB, Method, load_attrib, register
from mucs.config import post_dir
from mucs.errors import UserError


def normalise(scores, mode):
    s = scores.double()
    if mode == "rank":
        return torch.from_numpy(rankdata(s.numpy(), axis=1) - 1) / max(1, s.shape[1] - 1)
    if mode == "zscore":
        return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-12)
    raise UserError(f"attrib.mode must be rank or zscore, not {mode!r}")


@register("ensemble")
class Ensemble(Method):
    batch_targets = 64

    def prepare(self):
        cfg, ctx = self.cfg, self.ctx
        methods = list(cfg.methods or [])
        weights = list(cfg.weights) if cfg.weights is not None else [1.0] * len(methods)
        if not methods or "ensemble" in methods or len(weights) != len(methods):
            raise UserError("attrib.methods must list other methods (e.g. attrib.methods=[pixel,kernel]) and "
                            "attrib.weights, if given, one weight per method")
        total = 0
        for m, w in zip(methods, weights):
            run = post_dir(ctx.cfg, m)
            if not (run / ATTRIB).exists():
                raise UserError(f"ensemble needs the saved scores of method {m!r}, but {run / ATTRIB} is missing; "
                                f"run --what=a --attrib={m} for this job first")
            a = load_attrib(run)
            if not torch.equal(a["train_ids"], ctx.train.ids):
                raise UserError(f"the scores of {m!r} in {run} are over another training split; "
                                f"rerun its --what=a --force")
            total = total + float(w) * normalise(a["scores"], cfg.mode)
        self.S = total / sum(float(w) for w in weights)

    def score(self, x, labels, index):
        if int(index.max()) >= len(self.S):
            raise UserError(f"the ensembled methods scored {len(self.S)} targets, this job has more; rerun them")
        return self.S[index].float()
