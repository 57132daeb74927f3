"""The attribution interface, its registry, and the runner that scores targets in resumable parts.

A method turns targets into scores[t, j]: how much training item j is responsible for target t
(higher = more). The runner saves one part file per target, so an attribution killed mid-way resumes
at the next target, and a Slurm array of shards writes the same parts an unsplit run writes.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mucs.config import differences
from mucs.errors import UserError
from mucs.io import digest, load_tensor_metadata, load_tensors, save_tensors, write_text
from mucs.precision import autocast, numerics

REGISTRY = {}
ATTRIB = "attrib.safetensors"
PARTS = "attrib-parts"


def register(name):
    """A class decorator: `@register("name")` names a Method subclass and puts it in the registry, where
    `--attrib=name` (with configs/attrib/name.yaml) and `mucs.attribute(..., method="name")` find it. Returns the
    decorator, which returns the class unchanged."""
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


@dataclass
class Context:
    """What a method may use: the job's config, the pre model (EMA weights, eval mode, frozen), the training
    split it was trained on (stable ids in `train.ids`), the dataset meta, the device, and two folders for
    caches: `shared_dir` (the pre run folder: reused by every method) and `work_dir` (this method's)."""
    cfg: object
    D: torch.nn.Module
    train: object
    meta: dict
    device: str
    shared_dir: Path
    work_dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def seed(self):
        """The job's training seed (cfg.seed), an int: for methods whose random draws are fixed per job."""
        return int(self.cfg.seed)

    def autocast(self):
        """The configured mixed precision (precision.autocast) for a method's training-like updates (e.g.
        unlearning steps). Scores that are small differences of losses are safer in float32."""
        return autocast(self.device, self.cfg.precision.autocast)

    def numerics(self):
        """The numerics a method computes under now (mucs.precision.numerics; the pre model's dtype)."""
        return numerics(self.device, self.cfg.precision.autocast, next(self.D.parameters()).dtype)

    def data_digest(self):
        """A digest of the training items (ids, images, labels): what per-job caches are computed over."""
        if "data" not in self.extra:
            t = self.train
            self.extra["data"] = digest(t.ids, t.images, t.labels, "none" if t.conds is None else t.conds)
        return self.extra["data"]

    def uses(self, what, key):
        """Note that this job's scores build on the per-job cache `what` of this key (see Method.numerics)."""
        self.extra.setdefault("caches", {})[what] = key


class Method:
    """The base class of an attribution method: subclass it, decorate the subclass with @register("name") and add
    configs/attrib/name.yaml. The runner constructs it as Method(cfg, ctx), with its config section `cfg` (the
    YAML's keys, overrides applied) and a Context, calls prepare() once and then score() on blocks of
    `batch_targets` targets; score returns one row of training-item scores per target."""

    name = "?"
    batch_targets = 1  # targets per score() call

    shares_work = False  # whether prepare() computes per-job caches worth computing once before shards start

    def __init__(self, cfg, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    def prepare(self):
        """Work shared by all targets (e.g. cached training-set quantities). Called once per process."""

    def score(self, x, labels, index):
        """x: targets [T, C, H, W] in [-1, 1]; labels: their condition vectors [T, d] or None; index: their
        target numbers [T]. Returns scores [T, n_train] aligned with ctx.train, or (scores, [info dict per target]);
        an info's "tensors" (a dict of per-item tensors [n_train], e.g. how many noises each item got) are saved
        beside the scores and merged into attrib.safetensors as [T, n_train]."""
        raise NotImplementedError

    def numerics(self):
        """What the scores were computed under, after prepare(): the context's numerics and the keys of the per-job
        caches they build on (so a cache recomputed under other numerics or another noise set changes it too)."""
        return dict(self.ctx.numerics(), caches=dict(self.ctx.extra.get("caches", {})))


def get_method(name):
    """The Method class registered as `name`; a UserError naming the registered ones if there is none."""
    # importing this module ran mucs/attrib/__init__.py first, which imports (so registers) every method
    if name not in REGISTRY:
        raise UserError(f"unknown attribution method {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def part_path(work_dir, t):
    """The file that holds target t's scores in a method's work folder:
    `<work_dir>/attrib-parts/t<t:05d>.safetensors`."""
    return Path(work_dir) / PARTS / f"t{t:05d}.safetensors"


def blocks(n_targets, batch_targets, shard=(0, 1)):
    """The batches of targets shard i/n scores, a list of lists of target numbers: fixed blocks of batch_targets
    (targets b*B ... b*B + B-1), blocks i, i+n, ... A shard or a resumed run thus scores every target in the same
    batch as one unsplit run, so methods whose batched arithmetic depends on the batch still give the same scores
    bit for bit."""
    bs = max(1, batch_targets)
    return [list(range(b, min(b + bs, n_targets))) for b in range(shard[0] * bs, n_targets, shard[1] * bs)]


def attribute(method: Method, x, labels, work_dir, shard=(0, 1)):
    """The runner of `--what=a`: score targets x [T, C, H, W] in [-1, 1] (condition vectors `labels` [T, d] or
    None) with `method`, block by block (see `blocks`), writing one part file per target into `work_dir`. Blocks
    whose targets all have a part made under the method's numerics (Method.numerics) are skipped, so a killed run
    resumes; a part scored under other numerics is scored again, never merged with the others. `shard=(i, n)`
    scores shard i's blocks only. Returns None; non-finite scores raise a UserError."""
    mine = blocks(len(x), method.batch_targets, shard)
    if not mine:
        return
    method.prepare()
    now = method.numerics()
    stale = [t for b in mine for t in b if part_path(work_dir, t).exists() and part_numerics(work_dir, t) != now]
    if stale:
        print(f"[a] targets {stale[:10]}{' ...' if len(stale) > 10 else ''} were scored under other numerics "
              f"({'; '.join(differences(part_numerics(work_dir, stale[0]), now))}); scoring them again")
    todo = [b for b in mine if any(t in stale or not part_path(work_dir, t).exists() for t in b)]
    if not todo:
        return
    bar = tqdm(total=sum(map(len, todo)), desc=f"a[{method.name}]", unit="target", dynamic_ncols=True)
    for block in todo:
        idx = torch.tensor(block)
        t0 = time.time()
        out = method.score(x[idx], None if labels is None else labels[idx], idx)
        scores, infos = out if isinstance(out, tuple) else (out, [{} for _ in idx])
        if not torch.isfinite(scores).all():
            raise UserError(f"method {method.name} produced non-finite scores for targets {idx.tolist()}; "
                            f"check its settings (e.g. learning rate) and rerun")
        dt = (time.time() - t0) / len(idx)
        for k, t in enumerate(idx.tolist()):
            info = dict(infos[k], target=t, seconds=round(dt, 3))
            extra = {n: v.cpu() for n, v in info.pop("tensors", {}).items()}
            save_tensors(part_path(work_dir, t), dict(extra, scores=scores[k].float().cpu()),
                         metadata=dict(info=info, numerics=now))
        bar.update(len(idx))
        bar.set_postfix(s_per_target=f"{dt:.2f}")
    bar.close()


def part_numerics(work_dir, t):
    return load_tensor_metadata(part_path(work_dir, t), what="attribution part").get("numerics")


def merge(work_dir, n_targets, train_ids, num_removal):
    """Reduce the part files into attrib.safetensors (scores [T, n_train], top_ids [T, k], train_ids) and
    the per-target log attrib_log.jsonl. Returns the missing targets (empty when done)."""
    missing = [t for t in range(n_targets) if not part_path(work_dir, t).exists()]
    if missing:
        return missing
    made = [part_numerics(work_dir, t) for t in range(n_targets)]
    other = [t for t in range(n_targets) if made[t] != made[0]]
    if other:
        raise UserError(f"the parts of targets {other[:10]} in {work_dir} were scored under other numerics than target "
                        f"0's ({'; '.join(differences(made[0], made[other[0]]))}); scores of different numerics are "
                        f"not combined: rerun --what=a --force (its shards on one kind of device)")
    parts = [load_tensors(part_path(work_dir, t), what="attribution part") for t in range(n_targets)]
    scores = torch.stack([p["scores"] for p in parts])
    extra = {n: torch.stack([p[n] for p in parts]) for n in parts[0] if n != "scores" and all(n in p for p in parts)}
    if scores.shape[1] != len(train_ids):
        raise UserError(f"attribution parts in {work_dir} have {scores.shape[1]} scores per target but the training "
                        f"split has {len(train_ids)} items; they belong to another run: rerun with --force")
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :num_removal]
    save_tensors(Path(work_dir) / ATTRIB, dict(extra, scores=scores, top_ids=train_ids[order], train_ids=train_ids))
    logs = [load_tensor_metadata(part_path(work_dir, t))["info"] for t in range(n_targets)]
    write_text(Path(work_dir) / "attrib_log.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in logs))
    return []


def load_attrib(work_dir):
    """The merged attribution file of a post folder, a dict of scores [T, n_train], top_ids [T, k] and train_ids
    [n_train]; a UserError if it is missing, damaged or not an attribution file of this toolkit."""
    t = load_tensors(Path(work_dir) / ATTRIB, what="attribution ids file", hint="rerun --what=a")
    if not {"scores", "top_ids", "train_ids"} <= set(t):
        raise UserError(f"{Path(work_dir) / ATTRIB} is not an attribution file of this toolkit; rerun --what=a")
    return t
