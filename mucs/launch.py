"""Run the stages as Slurm jobs through submitit. A job runs the same `run_stage` as a local run; this module
only decides where and in which order.

  submit(cfg, names, overrides)  one job per stage chained with afterok; `a`, `logo` and `lds` as an array of
                                 shards + a merge job, after a job that does the work the shards share once
                                 (a method's per-job caches, e.g. MUCS's L_orig)
  StageJob                       what a job runs: re-composes the config from its overrides and runs one stage;
                                 on a time limit or preemption submitit calls checkpoint(), which requeues a fresh
                                 instance that resumes from the stage's own files
  plan_grid / submit_grid        jobs x seeds x methods, the pre stages once per (job, seed)

Every submission leaves a record per stage (mucs.slurm_status): the status command reads them, and a later
submission waits for a stage's live job instead of submitting the stage twice.
"""
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from mucs import config as C
from mucs import manifest as M
from mucs.errors import UserError
from mucs.io import write_json
from mucs.runner import STAGES, prepare_stage, run_stage
from mucs.slurm_status import kind_of, live_jobs, record_path, slurm_dir, stages_of
from mucs.stages import Job, check_model, plan_meta

RESOURCES = {  # launcher config key -> submitit parameter
    "partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
    "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node", "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb", "timeout_min": "timeout_min"}


# ---------------------------------------------------------------------------------------------
# What one job runs


class StageJob(Checkpointable):
    """One stage of one job (one shard of `a`, or its merge when shard is (-1, n)), run inside a Slurm job.
    A pure function of its overrides: the config is re-composed here, not pickled. will_run: the stages of
    its submission (as for a local run of the same command)."""

    def __init__(self, overrides, stage, shard=(0, 1), will_run=(), resume=False, prepare=False):
        self.overrides, self.stage, self.shard = list(overrides), stage, tuple(shard)
        self.will_run, self.resume, self.manifest, self.prepare = tuple(will_run), resume, None, prepare

    def __call__(self):
        cfg = C.compose(self.overrides)
        if self.resume:
            cfg.force = False
        job = Job(cfg)
        self.manifest = M.manifest_path(job, STAGES[self.stage])
        try:
            if self.prepare:  # the work its shards share, before the array starts
                prepare_stage(job, self.stage, will_run=self.will_run)
            else:
                run_stage(job, self.stage, will_run=self.will_run, shard=self.shard)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on a time limit or preemption: requeue a fresh instance. --force removes the
        stage's manifest before redoing it; once it is gone, the requeued job resumes instead of starting over."""
        resume = self.resume or (self.manifest is not None and not self.manifest.exists())
        print(f"[slurm] {self.stage}: time limit or preemption; requeued, it resumes from its files", flush=True)
        return DelayedSubmission(StageJob(self.overrides, self.stage, self.shard, self.will_run, resume, self.prepare))


def job_overrides(cfg, overrides):
    """The overrides a job composes its config from: no launcher (the job runs its stage in process) and the
    resolved pointer_to pinned, so the job does not depend on the environment of the shell that submitted it."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] != "launcher"]
    if not any(o.startswith("paths.pointer_to=") for o in keep):
        keep = [f"paths.pointer_to='{cfg.paths.pointer_to}'"] + keep
    return keep + ["launcher=local"]


# ---------------------------------------------------------------------------------------------
# Resources and submission


def resources(lc, stage):
    """submitit parameters of a stage: the launcher's values, overridden by launcher.stages.<stage>."""
    own = lc.stages.get(stage) or {}
    params = {}
    for key, name in RESOURCES.items():
        v = own.get(key) if own.get(key) is not None else lc.get(key)
        if v is not None and not (key == "gpus_per_node" and v == 0):
            params[name] = v
    extra = {**(lc.additional or {}), **(own.get("additional") or {})}
    if lc.kill_on_invalid_dep:  # else a dependant of a failed job stays pending forever
        extra.setdefault("kill_on_invalid_dep", "yes")
    params["slurm_additional_parameters"] = dict(extra)
    if lc.setup:
        params["slurm_setup"] = list(lc.setup)
    return params


def make_executor(folder, lc):
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: --launcher=slurm submits from a Slurm login node; use --launcher=local "
                        "to run here")
    import submitit

    kw = dict(slurm_python=lc.python) if lc.python else {}
    return submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=int(lc.max_num_timeout), **kw)


def sbatch(lc, folder, stage, calls, after, name):
    """Submit calls (one job, or an array when several) that start after the jobs `after` succeed; their ids."""
    ex = make_executor(folder, lc)
    params = resources(lc, stage)
    if after:
        params["slurm_dependency"] = "afterok:" + ":".join(after)
    ex.update_parameters(name=name, slurm_array_parallelism=int(lc.array_parallelism), **params)
    try:
        jobs = ex.submit_array(calls) if len(calls) > 1 else [ex.submit(calls[0])]
    except Exception as e:  # sbatch refused: unknown partition, more than a node has ...
        lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [repr(e)]
        raise UserError(f"sbatch refused the {stage} job: {lines[-1].strip()[:300]}; check the launcher.* settings")
    return [j.job_id for j in jobs]


def wiring(job, names, waiting):
    """[(stage, action, deps)] in pipeline order: action is 'done' (outputs exist), 'queued' (a live job of an
    earlier submission makes them) or 'submit'; deps are stages of this submission or job ids it waits for."""
    rows, submitting = [], set()
    for n in names:
        s = STAGES[n]
        if M.is_done(job, s) and not job.cfg.force:
            M.check_record(job, s)
            rows.append((n, "done", []))
            continue
        if n in waiting:
            rows.append((n, "queued", list(waiting[n])))
            continue
        M.check_inputs(job, s, will_run=submitting | set(waiting))  # missing or stale inputs fail here, not later
        deps = []
        for _, producer in s.inputs(job):
            if producer in submitting:
                deps.append(producer)
            elif producer in waiting:
                deps += waiting[producer]
        rows.append((n, "submit", list(dict.fromkeys(deps))))
        submitting.add(n)
    return rows


def num_shards(job, stage):
    """How many array tasks a sharded stage gets: launcher.<stage>_shards (0: one per unit), but no more than its
    units (Stage.units: the method's batches of targets for `a`, the groups for `logo`, the subset models for
    `lds`): further shards would have nothing to do."""
    n = int(job.cfg.launcher.get(f"{stage}_shards") or 0)
    units, what = STAGES[stage].units(job)
    if units is None:  # not known before the stage runs (the user's targets)
        return max(n, 1)
    n = n or units
    if n > units:
        print(f"  (launcher.{stage}_shards={n} capped to {units}: {what})")
    return max(1, min(n, units))


def submit_stages(cfg, names, overrides, after=None):
    """Submit the stages `names` of one job; returns {stage: [job ids its dependants wait for]}, including stages
    queued by earlier submissions and `after` (stage -> job ids, e.g. the pre stages of a grid)."""
    from omegaconf import OmegaConf

    lc, run = cfg.launcher, C.run_name(cfg)
    job = Job(OmegaConf.merge(cfg, {"device": "cpu"}))  # only its folders: the login node may have no GPU
    check_model(job, plan_meta(job))  # a model that does not fit the dataset is refused before any submission
    sdir = slurm_dir(cfg)
    folder = Path(lc.folder) if lc.folder else sdir
    waiting = {**live_jobs(sdir, cfg.attrib.name), **(after or {})}
    ov, out = job_overrides(cfg, overrides), {}
    for n, action, deps in wiring(job, names, waiting):
        if action == "done":
            print(f"  {n:5s} done already (--force redoes it)")
            continue
        if action == "queued":
            out[n] = deps
            print(f"  {n:5s} already queued as job {', '.join(deps)}")
            continue
        after_ids = [i for d in deps for i in (out[d] if d in out else [d])]
        name, shards = f"{n}:{run}", num_shards(job, n) if STAGES[n].sharded else 1
        if shards > 1:  # the work the shards share once, map over shards, then reduce once all of them succeeded
            prep = []
            if STAGES[n].prepare and STAGES[n].shares_work(job):
                prep = sbatch(lc, folder, n, [StageJob(ov, n, (0, shards), names, prepare=True)], after_ids,
                              f"prepare:{run}")
            calls = [StageJob(ov, n, (i, shards), names) for i in range(shards)]
            ids = sbatch(lc, folder, n, calls, prep or after_ids, name)
            array = ids[0].split("_")[0]
            wait = sbatch(lc, folder, "merge", [StageJob(ov, n, (-1, shards), names)], [array], f"merge:{run}")
            shown = (f"prepare {prep[0]} + " if prep else "") + f"jobs {array}_[0-{shards - 1}] ({shards} shards) + " \
                f"merge {wait[0]}"
            ids = prep + ids + wait
        else:
            ids = wait = sbatch(lc, folder, n, [StageJob(ov, n, will_run=names)], after_ids, name)
            shown = f"job {ids[0]}"
        write_json(record_path(sdir, kind_of(n, cfg.attrib.name), n), dict(
            stage=n, run=run, jobs=ids, wait=wait, logs=str(folder), after=after_ids, overrides=ov,
            submitted=time.strftime("%Y-%m-%d %H:%M:%S")))
        out[n] = wait
        print(f"  {n:5s} {shown}" + (f"  after {', '.join(after_ids)}" if after_ids else ""))
    return out


def submit(cfg, names, overrides):
    """pipeline.py --launcher=slurm: submit the stages, print their job ids and log folder, return 0 at once."""
    lc = cfg.launcher
    print(f"[slurm] {C.run_name(cfg)} (method {cfg.attrib.name}), run folders in {cfg.paths.logs}")
    submit_stages(cfg, names, overrides)
    print(f"[slurm] logs in {Path(lc.folder) if lc.folder else slurm_dir(cfg)}/ ; follow with: "
          f"python scripts/status.py --logs {cfg.paths.logs} {C.run_name(cfg)}")
    return 0


# ---------------------------------------------------------------------------------------------
# Grids of pipelines


@dataclass(frozen=True)
class Unit:
    """Stages of one (job, seed, method) submitted together; after_pre: they wait for the (job, seed)'s pre unit."""
    job: str
    seed: int
    method: str
    stages: tuple
    after_pre: bool


def plan_grid(jobs, methods, seeds, names):
    """One pre unit (tpre, gpre: they do not depend on the method) per (job, seed), then one post unit
    (a, tpost, gpost) per method waiting for it."""
    pre, post = (tuple(n for n in names if n in stages_of(k)) for k in ("pre", "post"))
    units = []
    for j in jobs:
        for s in seeds:
            if pre:
                units.append(Unit(j, s, methods[0], pre, False))
            units += [Unit(j, s, m, post, bool(pre)) for m in methods if post]
    return units


def submit_grid(jobs, methods, seeds, names, overrides, dry_run=False):
    """scripts/launch_grid.py: submit the grid of plan_grid (or only print it), the pre stages once per
    (job, seed) and every post unit after its pre unit."""
    units = plan_grid(jobs, methods, seeds, names)
    over = lambda u: overrides + [f"job={u.job}", f"seed={u.seed}", f"attrib={u.method}"]  # noqa: E731
    cfgs = {u: C.compose(over(u)) for u in units}  # every unit's settings are checked before anything is submitted
    print(f"grid: {len(jobs)} job(s) x {len(seeds)} seed(s) x {len(methods)} method(s): "
          f"{sum(not u.after_pre for u in units)} + {sum(u.after_pre for u in units)} submissions")
    for u in units:
        kind = "pre" if u.stages[0] in stages_of("pre") else f"post_{u.method}"
        print(f"  {C.run_name(cfgs[u])}  {kind:14s} {','.join(u.stages)}" + ("  after pre" if u.after_pre else ""))
    if dry_run:
        return 0
    pre_jobs = {}
    for u in units:
        print(f"[slurm] {C.run_name(cfgs[u])} {','.join(u.stages)} (method {u.method})")
        after = pre_jobs.get((u.job, u.seed)) if u.after_pre else None
        ids = submit_stages(cfgs[u], list(u.stages), over(u), after=after)
        if not u.after_pre:
            pre_jobs[u.job, u.seed] = ids
    print(f"[slurm] follow with: python scripts/status.py --logs {cfgs[units[0]].paths.logs}")
    return 0
