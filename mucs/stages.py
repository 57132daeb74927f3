"""The five stages of a job. Each is an idempotent function of the resolved config that reads and writes
files in the job's run folders; launchers (local, Slurm) only decide where it runs.

  tpre   train the base model on the training split             -> <run>--pre/model-*.safetensors
  gpre   generate targets + controls from held-out seeds         -> <run>--pre/samples.safetensors
  a      attribute the targets to training ids                   -> <run>--post_<m>/attrib.safetensors
  tpost  retrain from scratch without the union of top ids       -> <run>--post_<m>/model-*.safetensors
  gpost  regenerate every sample with the same seeds             -> <run>--post_<m>/samples.safetensors
"""
import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from mucs import config as C
from mucs import distributed
from mucs import lds
from mucs import logo
from mucs.attrib.base import ATTRIB, Context, attribute, get_method, load_attrib, merge
from mucs.data import ensure_dataset, load_split, remove_ids, subsample
from mucs.errors import UserError
from mucs.generate import SAMPLES, generate_post, generate_pre, load_samples, load_user_targets
from mucs.io import file_hash, read_json, write_json, write_text
from mucs.lock import LOCK, FolderLock
from mucs.model import build_denoiser, import_pretrained, labels_of, load_denoiser
from mucs.train import train

ORDER = ["tpre", "gpre", "a", "tpost", "gpost"]
EXTRA = ["lds", "logo"]  # stages outside the counterfactual pipeline: run only when named in --what, after it
SHARDED = ("a", "lds", "logo")  # stages that take --shard i/n (their parts side by side) and -1/n (the merge)


def resolve_device(name, world=distributed.World()):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; use device=cpu or device=auto")
    return distributed.local_device(name, world)


def code_version():
    try:
        out = subprocess.run(["git", "-C", str(C.REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    if job.cfg.sample.sampler not in ("heun", "diffusers"):
        raise UserError(f"sample.sampler={job.cfg.sample.sampler!r} is not heun or diffusers")
    if job.cfg.sample.sampler == "diffusers" and job.cfg.model.precond.kind != "ddpm":
        raise UserError("sample.sampler=diffusers steps with a diffusers scheduler, which needs a diffusers model "
                        "(model=diffusers_unet, model=diffusers_dit or pretrained=<folder>); use sample.sampler=heun")
    D = build_denoiser(job.cfg.model, meta or job.meta, device="meta")
    return sum(p.numel() for p in D.parameters())


# ---------------------------------------------------------------------------------------------
# The stages


def run_tpre(job):
    if job.world.main:
        write_text(job.pre / "config.yaml", C.to_yaml(job.cfg))
    if job.cfg.pretrained:  # a diffusers model the user already has stands in for the training
        if job.world.main:
            import_pretrained(job.cfg, job.meta, job.pre)
        return
    train(job.cfg, job.train_split, job.test_split, job.meta, job.pre, job.device, desc="tpre", world=job.world)


def parts_dir(job, stage):
    """Where a generation stage keeps its finished batches until its manifest is written."""
    return STAGES[stage].folder(job) / f"{stage}-parts"


def run_gpre(job):
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


def run_a(job, shard=(0, 1)):
    k = C.num_removal(job.cfg)
    if k >= len(job.train_split):
        raise UserError(f"num_removal {k} is not smaller than the training set ({len(job.train_split)} items); "
                        f"lower --topk_factor or num_removal")
    write_text(job.post / "config.yaml", C.to_yaml(job.cfg))
    if shard[0] != -1:  # -1/n only merges the shards' parts
        x, labels = targets_of(job)
        method = get_method(job.cfg.attrib.name)(job.cfg.attrib, attrib_context(job))
        attribute(method, x, labels, job.post, shard)
    if shard[1] == 1 or shard[0] == -1:
        reduce_a(job)


def reduce_a(job):
    x, _ = targets_of(job)
    missing = merge(job.post, len(x), job.train_split.ids, C.num_removal(job.cfg))
    if missing:
        raise UserError(f"attribution of targets {missing[:10]} is missing in {job.post}; run their shards first")


def run_tpost(job):
    if not torch.equal(load_attrib(job.post)["train_ids"], job.train_split.ids):
        raise UserError(f"{job.post / ATTRIB} ranks another training split than this job's (other data or "
                        f"--subsample); redo it with {redo('a')}")
    mode = job.cfg.tpost.mode
    if mode not in ("retrain", "finetune"):
        raise UserError(f"tpost.mode={mode!r} is not retrain or finetune; retrain (from scratch) is the protocol's")
    removed = job.removed_ids()
    kept = remove_ids(job.train_split, removed)
    if job.world.main:
        print(f"[tpost] removing {len(removed)} of {len(job.train_split)} training items (union over targets); "
              f"{'retraining from scratch' if mode == 'retrain' else 'fine-tuning the pre model'}")
    train(job.cfg, kept, job.test_split, job.meta, job.post, job.device, desc="tpost", world=job.world,
          init=job.weights(job.pre) if mode == "finetune" else None)


def run_gpost(job):
    pre = load_samples(job.pre)
    generate_post(job.denoiser(job.post), job.cfg, pre, job.post, job.device, parts=parts_dir(job, "gpost"))
    post = load_samples(job.post, stage="gpost")
    if not torch.equal(pre["seeds"], post["seeds"]):
        raise UserError(f"pre and post samples have different seeds in {job.post}; rerun --what=gpost --force")


@dataclass
class Stage:
    name: str
    run: Callable
    folder: Callable  # job -> run folder of its outputs
    outputs: tuple  # file names in that folder
    inputs: Callable  # job -> [(path, stage that writes it)]
    depends: tuple  # config sections its output depends on
    extent: tuple = ()  # settings that set only how much it computes (e.g. LDS subsets): a finished stage whose
    #                     settings differ in these alone runs again, keeping its finished parts


def data_files(job, splits=("train", "test")):
    """The dataset's split files, as inputs (they have no producing stage: 'data')."""
    return [(Path(job.cfg.data.folder) / f"{s}.safetensors", "data") for s in splits]


def tpre_inputs(job):
    """The data, or with pretrained= the folder's weights file (its hash goes into the manifest)."""
    if job.cfg.pretrained:
        from mucs.diffusers_adapter import find_model_folder, weights_file
        return [(weights_file(find_model_folder(job.cfg.pretrained)[0]), "pretrained")] + data_files(job)
    return data_files(job)


def tpost_inputs(job):
    finetune = [(job.weights(job.pre), "tpre")] if job.cfg.tpost.mode == "finetune" else []
    return [(job.post / ATTRIB, "a")] + finetune + data_files(job)


STAGES = {s.name: s for s in [
    Stage("tpre", run_tpre, lambda j: j.pre, ("model-best.safetensors", "model-last.safetensors"),
          tpre_inputs, ("data", "model", "train", "seed", "subsample")),
    Stage("gpre", run_gpre, lambda j: j.pre, (SAMPLES,),
          lambda j: [(j.weights(j.pre), "tpre")] + data_files(j, ("test",)),
          ("sample", "num_attrib", "control_factor", "use_last_ckpt")),
    Stage("a", run_a, lambda j: j.post, (ATTRIB,),
          lambda j: [(j.weights(j.pre), "tpre")] + ([] if j.cfg.targets else [(j.pre / SAMPLES, "gpre")])
          + data_files(j, ("train",)),
          ("attrib", "topk_factor", "num_removal", "targets", "use_last_ckpt")),
    Stage("tpost", run_tpost, lambda j: j.post, ("model-best.safetensors", "model-last.safetensors"),
          tpost_inputs, ("data", "model", "train", "seed", "subsample", "tpost")),
    Stage("gpost", run_gpost, lambda j: j.post, (SAMPLES,),
          lambda j: [(j.weights(j.post), "tpost"), (j.pre / SAMPLES, "gpre")], ("sample", "use_last_ckpt")),
    Stage("lds", lds.run, lds.folder, (lds.OUTPUTS,), lambda j: [(j.pre / SAMPLES, "gpre")] + data_files(j),
          ("data", "model", "train", "seed", "subsample", "lds", "use_last_ckpt"), ("lds.num_subsets", "lds.num_seeds")),
    Stage("logo", logo.run_logo, lambda j: logo.logo_dir(j.cfg), (logo.LOGO,), logo.logo_inputs,
          ("data", "model", "train", "seed", "subsample", "groups", "sample", "num_attrib", "control_factor", "targets",
           "use_last_ckpt")),
]}
DATA_PARALLEL = ("tpre", "tpost", "logo")  # stages every process of a data-parallel world runs; rank 0 runs the others


# ---------------------------------------------------------------------------------------------
# Manifests: what an output was computed from. A stage refuses an input whose stage has not finished,
# that changed since it was written, or that was made from settings or inputs that changed since;
# an unfinished stage refuses to resume progress made with other settings or inputs.


def manifest_path(job, stage):
    return stage.folder(job) / f"{stage.name}.manifest.json"


def progress_path(job, stage):
    """What an unfinished attempt of a stage computes from (removed when its manifest is written)."""
    return stage.folder(job) / f"{stage.name}.progress.json"


FOLDER_SETTINGS = ("data", "model", "train", "seed", "subsample")  # a run folder's settings that results depend on
_HASHES = {}


def hash_of(path):
    """file_hash, remembered per (file, size, mtime) within this process."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_hash(path)
    return _HASHES[key]


def settings_of(cfg, keys):
    """Config sections as plain data; the dataset's location is not a setting (its files are hashed as inputs),
    nor what its config expects the data to be (data.expect)."""
    s = C.sections(cfg, *keys)
    if isinstance(s.get("data"), dict):
        s["data"] = {k: v for k, v in s["data"].items() if k not in ("folder", "expect")}
    if isinstance(s.get("attrib"), dict):  # how fast, not what: batch layout and compilation change only float noise
        s["attrib"] = {k: v for k, v in s["attrib"].items() if k not in ("eval_batch", "compile", "channels_last")}
    return C.drop_later_defaults(s, cfg.model.net)


def redo(name):
    return f"--what={','.join(ORDER[ORDER.index(name):] if name in ORDER else [name])} --force"


def extended(stage, old, new):
    """Settings `old` differ from `new` in the stage's extent keys alone (Stage.extent)."""
    def without(s):
        for key in stage.extent:
            *parents, last = key.split(".")
            d = s
            for p in parents:
                d = d.get(p, {})
            d.pop(last, None)
        return s
    if not stage.extent or not isinstance(old, dict):
        return False
    old, new = (json.loads(json.dumps(s, sort_keys=True, default=str)) for s in (old, new))  # copies, as manifests hold them
    return old != new and without(old) == without(new)


def check_settings(job, stage, recorded, what, fix):
    """Refuse `what` (outputs or progress of `stage`) if it was made with other settings than the current ones."""
    now = settings_of(job.cfg, stage.depends)
    if recorded.get("config") == C.hash_settings(now) or extended(stage, recorded.get("settings"), now):
        return
    diff = C.differences(recorded["settings"], now) if "settings" in recorded else [f"{', '.join(stage.depends)}"]
    raise UserError(f"{what} was made with other settings ({'; '.join(diff)}); pass the same settings, or {fix}")


def input_key(path):
    """How a manifest names an input: its folder and file name, so copied or moved run folders keep their meaning."""
    return f"{Path(path).parent.name}/{Path(path).name}"


def check_files(name, folder, m, outs, inputs):
    """Outputs `outs` of stage `name` in `folder` are as its manifest m records, and so are its `inputs` (their
    current paths)."""
    for o in outs:
        h = m.get("outputs", {}).get(o)
        if h and (Path(folder) / o).exists() and hash_of(Path(folder) / o) != h:
            raise UserError(f"{Path(folder) / o} changed since {name} wrote it (corrupted or replaced); "
                            f"redo it with {redo(name)}")
    for path in inputs:
        h = m.get("inputs", {}).get(input_key(path))
        if h and Path(path).exists() and hash_of(path) != h:
            raise UserError(f"{Path(folder) / outs[0]} was made from {path}, which changed since (redone or "
                            f"replaced); redo it with {redo(name)}")


def check_record(job, stage, only=None):
    """A finished stage's outputs (or just `only`) are as it wrote them, its inputs as it read them, all made
    with the current settings, and so on up the pipeline."""
    folder, m = stage.folder(job), read_json(manifest_path(job, stage))
    check_settings(job, stage, m, f"{stage.name} output in {folder}", f"redo it with {redo(stage.name)}")
    check_files(stage.name, folder, m, [Path(only).name] if only else list(stage.outputs),
                [p for p, _ in stage.inputs(job)])
    for path, producer in stage.inputs(job):
        if producer in STAGES and Path(path).exists():
            check_fresh(job, producer, path)


def check_finished(folder, name):
    """For readers outside a pipeline (eval): stage `name` finished in `folder` and nothing it wrote or read
    has changed since."""
    path = Path(folder) / f"{name}.manifest.json"
    if not path.exists():
        raise UserError(f"stage {name} has not finished in {folder} (no {path.name}); run --what={name} first")
    m = read_json(path)
    check_files(name, folder, m, list(m.get("outputs", {})) or ["outputs"],
                [Path(folder).parent / k for k in m.get("inputs", {})])  # the run folders' inputs next to it


def check_fresh(job, name, path):
    """An input `path` written by stage `name` is finished and current."""
    s = STAGES[name]
    if not manifest_path(job, s).exists():
        raise UserError(f"{path} is there but stage {name} has not finished (no {manifest_path(job, s).name}); "
                        f"run --what={name} first (it resumes)")
    check_record(job, s, only=path)


def check_saved_config(job, folder, writer, will_run):
    """The config.yaml a run folder was made with agrees with the current config on FOLDER_SETTINGS."""
    path = Path(folder) / "config.yaml"
    if not path.exists() or (job.cfg.force and writer in will_run):
        return
    diff = C.differences(settings_of(C.load_saved(path), FOLDER_SETTINGS), settings_of(job.cfg, FOLDER_SETTINGS))
    if diff:
        raise UserError(f"run folder {folder} was made with other settings ({'; '.join(diff)}); pass the settings "
                        f"saved in {path}, or redo the folder with {redo(writer)}")


def start_progress(job, stage):
    """Record what this attempt computes from; refuse to resume progress made with other settings or inputs.
    Returns the input hashes (taken now, before the stage reads them) for the manifest."""
    now = settings_of(job.cfg, stage.depends)
    rec = dict(stage=stage.name, config=C.hash_settings(now), settings=now,
               inputs={input_key(p): hash_of(p) for p, _ in stage.inputs(job) if Path(p).exists()})
    path, folder = progress_path(job, stage), stage.folder(job)
    if path.exists():
        old, fix = read_json(path), f"rerun --what={stage.name} with --force to start it over"
        check_settings(job, stage, old, f"the unfinished {stage.name} in {folder}", fix)
        for p, h in rec["inputs"].items():
            if old.get("inputs", {}).get(p, h) != h:
                raise UserError(f"the unfinished {stage.name} in {folder} was started from another {p} (it "
                                f"changed since); {fix}")
    write_json(path, rec)
    return rec["inputs"]


def is_done(job, stage):
    if not manifest_path(job, stage).exists() or not all((stage.folder(job) / o).exists() for o in stage.outputs):
        return False
    return not (stage.extent and extended(stage, read_json(manifest_path(job, stage)).get("settings"),
                                          settings_of(job.cfg, stage.depends)))


def check_manifest(job, stage):
    """Refuse to build on an output made with other settings, changed since, or made from inputs that changed since."""
    check_record(job, stage)


def write_manifest(job, stage, seconds, inputs=None):
    """The manifest: settings and their hash, input hashes (`inputs`, taken when the stage started), output
    hashes, code version and seconds."""
    now = settings_of(job.cfg, stage.depends)
    write_json(manifest_path(job, stage), dict(
        stage=stage.name, config=C.hash_settings(now), settings=now,
        inputs=inputs if inputs is not None else {input_key(p): hash_of(p) for p, _ in stage.inputs(job)},
        outputs={o: hash_of(stage.folder(job) / o) for o in stage.outputs},
        code=code_version(), seconds=round(seconds, 2), finished=time.strftime("%Y-%m-%d %H:%M:%S")))


def parse_what(what):
    names = [w.strip() for w in str(what).split(",") if w.strip()]
    bad = [w for w in names if w not in STAGES]
    if bad or not names:
        raise UserError(f"unknown stage {', '.join(bad) or repr(what)} in --what; stages are {','.join(ORDER + EXTRA)}")
    return [s for s in ORDER + EXTRA if s in names]


def plan(job, names):
    """[(stage, status, inputs, outputs)] in pipeline order; status is 'done', 'run' or 'redo'."""
    rows = []
    for n in names:
        s = STAGES[n]
        status = "done" if is_done(job, s) else "run"
        if status == "done" and job.cfg.force:
            status = "redo"
        rows.append((s, status, [str(p) for p, _ in s.inputs(job)], [str(s.folder(job) / o) for o in s.outputs]))
    return rows


def check_inputs(job, stage, will_run):
    """Every input is there (or its stage will run first) and, when its stage has finished, current."""
    for path, producer in stage.inputs(job):
        if producer in ("data", "pretrained"):  # outside the pipeline (a pretrained folder was checked at compose)
            job.meta  # builds a bundled dataset on first use, or says what is missing
        elif not Path(path).exists():
            if producer not in will_run:
                raise UserError(f"stage {stage.name} needs {path}, which is missing; run --what={producer} first")
        elif producer not in will_run or is_done(job, STAGES[producer]):
            check_fresh(job, producer, path)


def stage_lock(job, stage, shard=(0, 1)):
    """The lock of the stage's run folder (rank 0 holds it for a data-parallel world). Shards i/n of `a` (and
    `lds`) run side by side, each under a lock of its own."""
    if not job.world.main:
        return contextlib.nullcontext()
    sharded = stage.name in SHARDED and shard[1] > 1 and shard[0] >= 0
    name = f"{LOCK}-{stage.name}{shard[0]}of{shard[1]}" if sharded else LOCK
    return FolderLock(stage.folder(job), job.cfg.get("lock_wait", 0) or 0, what=f"stage {stage.name}", name=name)


def run_stage(job, name, will_run=(), **kw):
    s = STAGES[name]
    check_saved_config(job, job.pre, "tpre", will_run)
    if s.folder(job) != job.pre:
        check_saved_config(job, s.folder(job), "a" if s.folder(job) == job.post else name, will_run)
    check_inputs(job, s, will_run)
    with stage_lock(job, s, kw.get("shard", (0, 1))):
        job.world.barrier()  # the others look at the folder once rank 0 holds it
        run_locked(job, s, will_run, **kw)


def run_locked(job, s, will_run=(), **kw):
    name = s.name
    if is_done(job, s) and not job.cfg.force:
        check_manifest(job, s)
        print(f"[{name}] done already ({manifest_path(job, s)}); skipping (--force redoes it)")
        return
    t0 = time.time()
    if job.world.main:
        s.folder(job).mkdir(parents=True, exist_ok=True)
        if job.cfg.force:
            clear_progress(job, s, kw.get("shard", (0, 1)))
        inputs = start_progress(job, s)
    job.world.barrier()  # the others start from what rank 0 cleared
    if job.world.main or name in DATA_PARALLEL:
        s.run(job, **kw)
    if job.world.main and not (name in SHARDED and kw.get("shard", (0, 1))[1] > 1 and kw["shard"][0] != -1):
        write_manifest(job, s, time.time() - t0, inputs)  # (a shard's manifest is the reduce step's)
        progress_path(job, s).unlink(missing_ok=True)
        if name in ("gpre", "gpost"):
            shutil.rmtree(parts_dir(job, name), ignore_errors=True)  # the samples file holds them all now
        print(f"[{name}] done in {time.time() - t0:.1f} s -> {s.folder(job)}")
    job.world.barrier()  # the next stage reads this one's outputs


def clear_progress(job, s, shard=(0, 1)):
    """--force: forget resumable progress of this stage so it is recomputed (outputs are replaced atomically).
    A shard i/n of `a` forgets only its own blocks' parts (its siblings run at the same time); -1/n none."""
    import shutil
    d = s.folder(job)
    if s.name in ("tpre", "tpost"):
        (d / "train-state.pt").unlink(missing_ok=True)
    if s.name in ("gpre", "gpost"):
        shutil.rmtree(parts_dir(job, s.name), ignore_errors=True)
    progress_path(job, s).unlink(missing_ok=True)
    if s.name == "a" and shard[1] == 1:
        shutil.rmtree(d / "attrib-parts", ignore_errors=True)
    elif s.name == "a" and shard[0] >= 0:
        bs = max(1, get_method(job.cfg.attrib.name).batch_targets)
        for p in (d / "attrib-parts").glob("t*.safetensors"):
            if int(p.stem[1:]) // bs % shard[1] == shard[0]:  # its block is this shard's (attrib.base.blocks)
                p.unlink(missing_ok=True)
    if s.name == "lds":
        lds.clear(job, shard)
    if s.name == "logo":
        logo.clear_logo(job, shard)
    manifest_path(job, s).unlink(missing_ok=True)
