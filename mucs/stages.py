"""The stages of a job and their registry. Each stage is an idempotent function of the resolved config that
reads and writes files in one run folder; the runner (mucs.runner) and the launchers only decide when and
where it runs. The five stages of the counterfactual pipeline live here:

  tpre   train the base model on the training split             -> <run>--pre/model-*.safetensors
  gpre   generate targets + controls from held-out seeds         -> <run>--pre/samples.safetensors
  a      attribute the targets to training ids                   -> <run>--post_<m>/attrib.safetensors
  tpost  retrain from scratch without the union of top ids       -> <run>--post_<m>/model-*.safetensors
  gpost  regenerate every sample with the same seeds             -> <run>--post_<m>/samples.safetensors

Other modules add theirs with `add` (mucs.lds, mucs.logo, mucs.known: stages with a run folder of their own).
"""
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from mucs import config as C
from mucs import distributed
from mucs.attrib.base import ATTRIB, PARTS, Context, attribute, get_method, load_attrib, merge
from mucs.data import ensure_dataset, load_split, remove_ids, subsample
from mucs.errors import UserError
from mucs.generate import SAMPLES, generate_post, generate_pre, load_samples, load_user_targets
from mucs.io import write_text
from mucs.model import build_denoiser, import_pretrained, load_denoiser
from mucs.precision import scoring
from mucs.train import STATE, train


@dataclass
class Stage:
    name: str
    run: Callable  # (job, shard) -> None
    outputs: tuple  # file names in its run folder
    inputs: Callable  # job -> [(path, stage that writes it)]
    depends: tuple  # config keys (sections or dotted keys) its outputs depend on
    kind: str = "post"  # its run folder: "pre", "post" (<run>--post_<method>) or its own name (<run>--<name>)
    sharded: bool = False  # takes --shard i/n (parts side by side) and -1/n (the merge)
    data_parallel: bool = False  # every process of a data-parallel world runs it; rank 0 alone runs the others
    clear: Callable = None  # (job, shard) -> None: --force forgets its resumable progress
    finish: Callable = None  # job -> None: tidies up once its manifest is written
    units: Callable = None  # job -> (number of units, what they are): shards beyond them have nothing to do
    prepare: Callable = None  # job -> None: work its shards share, done once before them (a job of its own on Slurm)
    shares_work: Callable = lambda job: False  # whether `prepare` has anything to do for this job
    extent: tuple = ()  # dotted keys that set only how much it computes (e.g. LDS subsets): a finished stage whose
    #                     settings differ in these alone runs again, keeping its finished parts (manifest.extended)

    def folder(self, job):
        return job.pre if self.kind == "pre" else job.post if self.kind == "post" else C.run_dir(job.cfg, self.kind)


STAGES = {}  # name -> Stage, in the order they run when several are asked for
ORDER = ["tpre", "gpre", "a", "tpost", "gpost"]  # the counterfactual pipeline; the others run after it


def add(stage):
    STAGES[stage.name] = stage
    return stage


def resolve_device(name, world=distributed.World()):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use device=cpu or device=auto")
    return distributed.local_device(name, world)


class Job:
    """One dataset/model/seed/method job: its folders, data and models, all derived from the config."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pre, self.post = C.pre_dir(cfg), C.post_dir(cfg)
        self.world = distributed.world_from_env()  # one process unless started by torchrun / submitit tasks
        self.device = resolve_device(cfg.device, self.world)
        distributed.init(self.world, self.device)
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.precision.tf32)

    @cached_property
    def meta(self):
        return ensure_dataset(self.cfg.data.name, self.cfg.data.folder)

    @cached_property
    def train_split(self):
        """The training split the pre model sees: the whole split or a fixed subsample."""
        self.meta  # builds a bundled dataset on first use
        return subsample(load_split(self.cfg.data.folder, "train"), int(self.cfg.subsample), seed=0)

    @cached_property
    def test_split(self):
        self.meta
        return load_split(self.cfg.data.folder, "test")

    def weights(self, run_dir):
        name = "model-last.safetensors" if self.cfg.use_last_ckpt else "model-best.safetensors"
        return Path(run_dir) / name

    def denoiser(self, run_dir):
        return load_denoiser(self.cfg.model, self.meta, self.weights(run_dir), self.device)

    def removed_ids(self):
        return load_attrib(self.post)["top_ids"].flatten().unique()


def plan_meta(job):
    """The dataset's meta, or before it is preprocessed what its config expects (data.expect)."""
    if (Path(job.cfg.data.folder) / "meta.json").exists() or "expect" not in job.cfg.data:
        return job.meta
    return dict(job.cfg.data.expect)


def check_model(job, meta=None):
    """Build the configured model on the meta device (shapes only): a model that does not fit the dataset
    fails here, in one line. Returns its parameter count."""
    if job.cfg.sample.sampler == "diffusers" and job.cfg.model.precond.kind != "ddpm":
        raise UserError("sample.sampler=diffusers steps with a diffusers scheduler, which needs a diffusers model "
                        "(model=diffusers_unet, model=diffusers_dit or pretrained=<folder>); use sample.sampler=heun")
    D = build_denoiser(job.cfg.model, meta or job.meta, device="meta")
    return sum(p.numel() for p in D.parameters())


def data_files(job, splits=("train", "test")):
    """The dataset's split files, as inputs (they have no producing stage: 'data')."""
    return [(Path(job.cfg.data.folder) / f"{s}.safetensors", "data") for s in splits]


# ---------------------------------------------------------------------------------------------
# The five stages


def run_tpre(job, shard=(0, 1)):
    if job.world.main:
        write_text(job.pre / "config.yaml", C.to_yaml(job.cfg))
    if job.cfg.pretrained:  # a diffusers model the user already has stands in for the training
        if job.world.main:
            import_pretrained(job.cfg, job.meta, job.pre)
        return
    train(job.cfg, job.train_split, job.test_split, job.meta, job.pre, job.device, desc="tpre", world=job.world)


def tpre_inputs(job):
    """The data, or with pretrained= the folder's weights file (its hash goes into the manifest)."""
    if job.cfg.pretrained:
        from mucs.diffusers_adapter import find_model_folder, weights_file
        return [(weights_file(find_model_folder(job.cfg.pretrained)[0]), "pretrained")] + data_files(job)
    return data_files(job)


def parts_dir(job, stage):
    """Where a generation stage keeps its finished batches until its manifest is written."""
    return STAGES[stage].folder(job) / f"{stage}-parts"


def run_gpre(job, shard=(0, 1)):
    generate_pre(job.denoiser(job.pre), job.cfg, job.meta, job.test_split, C.num_gen(job.cfg), job.pre, job.device,
                 parts=parts_dir(job, "gpre"))


def targets_of(job):
    """The images to attribute: gpre's first num_attrib samples, or the user's own (cfg.targets)."""
    if job.cfg.targets:
        x = load_user_targets(job.cfg.targets, job.meta)
        return x, None
    s = load_samples(job.pre)
    n = int(s["num_attrib"])
    return s["images"][:n], (s["cond"][:n] if "cond" in s else None)


def attrib_context(job):
    return Context(job.cfg, job.denoiser(job.pre), job.train_split, job.meta, job.device, job.pre, job.post)


def attribution_method(job):
    return get_method(job.cfg.attrib.name)(job.cfg.attrib, attrib_context(job))


def run_a(job, shard=(0, 1)):
    write_text(job.post / "config.yaml", C.to_yaml(job.cfg))
    if shard[0] != -1:  # -1/n only merges the shards' parts
        x, labels = targets_of(job)
        with scoring(job.cfg):
            attribute(attribution_method(job), x, labels, job.post, shard)
    if shard[1] == 1 or shard[0] == -1:
        x, _ = targets_of(job)
        missing = merge(job.post, len(x), job.train_split.ids, C.num_removal(job.cfg))
        if missing:
            raise UserError(f"attribution of targets {missing[:10]} is missing in {job.post}; run their shards first")


def prepare_a(job):
    """What the shards of `a` share: the method's per-job caches (MUCS's L_orig, D-TRAK's features, GUDA's models,
    ...), computed once; each shard then reads them."""
    with scoring(job.cfg):
        attribution_method(job).prepare()


def forget_parts(work_dir, method, shard=(0, 1)):
    """--force of an attribution: a shard i/n forgets only its own blocks' parts (its siblings run at the same time);
    -1/n none."""
    parts = Path(work_dir) / PARTS
    if shard[1] == 1:
        shutil.rmtree(parts, ignore_errors=True)
    elif shard[0] >= 0:
        bs = max(1, get_method(method).batch_targets)
        for p in parts.glob("t*.safetensors"):
            if int(p.stem[1:]) // bs % shard[1] == shard[0]:  # its block is this shard's (attrib.base.blocks)
                p.unlink(missing_ok=True)


def clear_a(job, shard=(0, 1)):
    forget_parts(job.post, job.cfg.attrib.name, shard)


def a_units(job):
    """How many shards `a` can keep busy: the method's batches of targets (attrib.base.blocks)."""
    cfg = job.cfg
    if cfg.targets:  # the user's targets are counted only when loaded
        return None, "user targets"
    bs = max(1, get_method(cfg.attrib.name).batch_targets)
    return -(-int(cfg.num_attrib) // bs), f"{cfg.attrib.name} scores its {cfg.num_attrib} targets in batches of {bs}"


def run_tpost(job, shard=(0, 1)):
    if not torch.equal(load_attrib(job.post)["train_ids"], job.train_split.ids):
        raise UserError(f"{job.post / ATTRIB} ranks another training split than this job's (other data or "
                        f"--subsample); redo it with --what=a,tpost,gpost --force")
    mode = job.cfg.tpost.mode
    removed = job.removed_ids()
    kept = remove_ids(job.train_split, removed)
    if job.world.main:
        print(f"[tpost] removing {len(removed)} of {len(job.train_split)} training items (union over targets); "
              f"{'retraining from scratch' if mode == 'retrain' else 'fine-tuning the pre model'}")
    train(job.cfg, kept, job.test_split, job.meta, job.post, job.device, desc="tpost", world=job.world,
          init=job.weights(job.pre) if mode == "finetune" else None)


def tpost_inputs(job):
    finetune = [(job.weights(job.pre), "tpre")] if job.cfg.tpost.mode == "finetune" else []
    return [(job.post / ATTRIB, "a")] + finetune + data_files(job)


def run_gpost(job, shard=(0, 1)):
    pre = load_samples(job.pre)
    generate_post(job.denoiser(job.post), job.cfg, pre, job.post, job.device, parts=parts_dir(job, "gpost"))
    post = load_samples(job.post, stage="gpost")
    if not torch.equal(pre["seeds"], post["seeds"]):
        raise UserError(f"pre and post samples have different seeds in {job.post}; rerun --what=gpost --force")


def clear_parts(stage):
    """Forget a generation stage's finished batches (on --force, and once its samples file holds them all)."""
    return lambda job, shard=(0, 1): shutil.rmtree(parts_dir(job, stage), ignore_errors=True)


def clear_state(stage):
    """--force of a training stage: forget its training state."""
    return lambda job, shard=(0, 1): (STAGES[stage].folder(job) / STATE).unlink(missing_ok=True)


TRAINED = ("data", "model", "train", "seed", "subsample")  # what a trained model depends on
MADE = ("precision.autocast", "precision.tf32")  # the precision of training and sampling
SCORED = ("precision.autocast", "precision.score_tf32")  # the precision of scores (mucs.precision)
for _s in [
    Stage("tpre", run_tpre, ("model-best.safetensors", "model-last.safetensors"), tpre_inputs,
          TRAINED + MADE, kind="pre", data_parallel=True, clear=clear_state("tpre")),
    Stage("gpre", run_gpre, (SAMPLES,), lambda j: [(j.weights(j.pre), "tpre")] + data_files(j, ("test",)),
          ("sample", "num_attrib", "control_factor", "use_last_ckpt") + MADE, kind="pre", clear=clear_parts("gpre"),
          finish=clear_parts("gpre")),
    Stage("a", run_a, (ATTRIB,),
          lambda j: [(j.weights(j.pre), "tpre")] + ([] if j.cfg.targets else [(j.pre / SAMPLES, "gpre")])
          + data_files(j, ("train",)),
          ("attrib", "topk_factor", "num_removal", "targets", "use_last_ckpt") + SCORED, sharded=True, clear=clear_a,
          units=a_units, prepare=prepare_a, shares_work=lambda j: get_method(j.cfg.attrib.name).shares_work),
    Stage("tpost", run_tpost, ("model-best.safetensors", "model-last.safetensors"), tpost_inputs,
          TRAINED + ("tpost",) + MADE, data_parallel=True, clear=clear_state("tpost")),
    Stage("gpost", run_gpost, (SAMPLES,), lambda j: [(j.weights(j.post), "tpost"), (j.pre / SAMPLES, "gpre")],
          ("sample", "use_last_ckpt") + MADE, clear=clear_parts("gpost"), finish=clear_parts("gpost")),
]:
    add(_s)
