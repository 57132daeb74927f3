"""Run the stages as Slurm jobs through submitit. A job runs the same `run_stage` as a local run; this module
only decides where and in which order.

  submit(cfg, names, overrides)  one job per stage chained with afterok; `a`, `logo` and `lds` as an array of
                                 shards + a merge job
  StageJob                       what a job runs: re-composes the config from its overrides and runs one stage;
                                 on a time limit or preemption submitit calls checkpoint(), which requeues a fresh
                                 instance that resumes from the stage's own files
  plan_grid / grid_main          jobs x seeds x methods, the pre stages once per (job, seed)
  status / status_main           each stage done, pending, running, failed (with its log), cancelled or missing

Every submission leaves a record per stage in `<logs>/<run>--slurm/records/<pre|post_m>.<stage>.json` (its job
ids and log folder): the status command reads them, and a later submission waits for a stage's live job
instead of submitting the stage twice.
"""
import fnmatch
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from mucs import config as C
from mucs.errors import UserError
from mucs.io import read_json, write_json
from mucs.stages import EXTRA  # stages with a run folder of their own (<run>--logo, <run>--lds)

RESOURCES = {  # launcher config key -> submitit parameter
    "partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos", "constraint": "slurm_constraint",
    "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node", "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb", "timeout_min": "timeout_min"}
PRE, POST = ("tpre", "gpre"), ("a", "tpost", "gpost")
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
LIVE = WAITING | {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


# ---------------------------------------------------------------------------------------------
# What one job runs


class StageJob(Checkpointable):
    """One stage of one job (one shard of `a`, or its merge when shard is (-1, n)), run inside a Slurm job.
    A pure function of its overrides: the config is re-composed here, not pickled. will_run: the stages of
    its submission (as for a local run of the same command)."""

    def __init__(self, overrides, stage, shard=(0, 1), will_run=(), resume=False):
        self.overrides, self.stage, self.shard = list(overrides), stage, tuple(shard)
        self.will_run, self.resume, self.manifest = tuple(will_run), resume, None

    def __call__(self):
        from mucs import stages as S

        cfg = C.compose(self.overrides)
        if self.resume:
            cfg.force = False
        job = S.Job(cfg)
        self.manifest = S.manifest_path(job, S.STAGES[self.stage])
        try:
            kw = dict(shard=self.shard) if self.stage in S.SHARDED else {}
            S.run_stage(job, self.stage, will_run=self.will_run, **kw)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on a time limit or preemption: requeue a fresh instance. --force removes the
        stage's manifest before redoing it; once it is gone, the requeued job resumes instead of starting over."""
        resume = self.resume or (self.manifest is not None and not self.manifest.exists())
        print(f"[slurm] {self.stage}: time limit or preemption; requeued, it resumes from its files", flush=True)
        return DelayedSubmission(StageJob(self.overrides, self.stage, self.shard, self.will_run, resume))


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


def kind_of(stage, method):
    """The run folder a stage writes: <run>--pre, <run>--post_<method>, or its own (<run>--logo, <run>--lds)."""
    return "pre" if stage in PRE else stage if stage in EXTRA else f"post_{method}"


def slurm_dir(cfg):
    return Path(cfg.paths.logs) / f"{C.run_name(cfg)}--slurm"


def record_path(sdir, kind, stage):
    return Path(sdir) / "records" / f"{kind}.{stage}.json"


def wiring(job, names, waiting):
    """[(stage, action, deps)] in pipeline order: action is 'done' (outputs exist), 'queued' (a live job of an
    earlier submission makes them) or 'submit'; deps are stages of this submission or job ids it waits for."""
    from mucs import stages as S

    rows, submitting = [], set()
    for n in names:
        s = S.STAGES[n]
        if S.is_done(job, s) and not job.cfg.force:
            S.check_manifest(job, s)
            rows.append((n, "done", []))
            continue
        if n in waiting:
            rows.append((n, "queued", list(waiting[n])))
            continue
        S.check_inputs(job, s, will_run=submitting | set(waiting))  # missing or stale inputs fail here, not later
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
    """How many array tasks a sharded stage gets: launcher.<stage>_shards, but no more than its units (the
    method's batches of targets for `a`, see attrib.base.blocks; the groups for `logo`, 0 meaning one task each;
    the subset models for `lds`): further shards would have nothing to do."""
    from mucs import lds
    from mucs.attrib.base import get_method
    from mucs.groups import load_groups

    cfg = job.cfg
    n = int(cfg.launcher.get(f"{stage}_shards") or 0)
    if stage == "a":
        if cfg.targets:  # the user's targets are counted only when loaded
            return max(n, 1)
        bs = max(1, get_method(cfg.attrib.name).batch_targets)
        units = -(-int(cfg.num_attrib) // bs)
        what = f"{cfg.attrib.name} scores its {cfg.num_attrib} targets in batches of {bs}"
    elif stage == "logo":
        units = len(load_groups(cfg.groups, job.train_split, job.meta))
        what, n = f"there are {units} groups", n or units
    else:
        units = len(lds.units(cfg))
        what = f"LDS trains {units} models"
    if n > units:
        print(f"  (launcher.{stage}_shards={n} capped to {units}: {what})")
    return max(1, min(n, units))


def submit_stages(cfg, names, overrides, after=None):
    """Submit the stages `names` of one job; returns {stage: [job ids its dependants wait for]}, including stages
    queued by earlier submissions and `after` (stage -> job ids, e.g. the pre stages of a grid)."""
    from omegaconf import OmegaConf

    from mucs import stages as S

    lc, run = cfg.launcher, C.run_name(cfg)
    for key in ("a_shards", "lds_shards"):
        if int(lc[key]) < 1:
            raise UserError(f"launcher.{key} must be at least 1, not {lc[key]}")
    if int(lc.logo_shards) < 0:
        raise UserError(f"launcher.logo_shards must be 0 (one per group) or more, not {lc.logo_shards}")
    job = S.Job(OmegaConf.merge(cfg, {"device": "cpu"}))  # only its folders: the login node may have no GPU
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
        name, shards = f"{n}:{run}", num_shards(job, n) if n in S.SHARDED else 1
        if shards > 1:  # map over shards, then reduce once all of them succeeded
            calls = [StageJob(ov, n, (i, shards), names) for i in range(shards)]
            ids = sbatch(lc, folder, n, calls, after_ids, name)
            array = ids[0].split("_")[0]
            wait = sbatch(lc, folder, "merge", [StageJob(ov, n, (-1, shards), names)], [array], f"merge:{run}")
            ids, shown = ids + wait, f"jobs {array}_[0-{shards - 1}] ({shards} shards) + merge {wait[0]}"
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
# Slurm's view of submitted jobs


def slurm_states(ids):
    """{job id: state} for the given jobs and every task of the given arrays, from sacct (finished jobs) and
    squeue (live ones, which accounting may not know yet). Jobs Slurm does not know are absent."""
    bases = sorted({str(i).split("_")[0] for i in ids})
    if not bases:
        return {}
    states = {}
    for cmd in (["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,State"],
                ["squeue", "-h", "-j", ",".join(bases), "-o", "%i|%T"]):
        try:
            lines = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            continue
        for line in lines:
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid.strip()] = (state.split() or ["UNKNOWN"])[0]
    return states


def read_records(sdir):
    """{(kind, stage): record} of a run's slurm folder."""
    return {tuple(p.stem.split(".", 1)): read_json(p) for p in sorted((Path(sdir) / "records").glob("*.json"))}


def stage_state(rec, states):
    """(status, job, log) of a stage from the states of its recorded jobs."""
    bases = {j.split("_")[0] for j in rec["jobs"]}
    rows = {j: s for j, s in states.items() if j.split("_")[0] in bases}
    if not rows:
        return "missing", f"jobs {', '.join(rec['jobs'])} unknown to Slurm", None
    live = sorted(j for j, s in rows.items() if s in LIVE)
    if live:
        running = [j for j in live if rows[j] not in WAITING]
        return ("running", running[0], None) if running else ("pending", live[0], None)
    log = lambda j: Path(rec["logs"]) / f"{j}_0_log.err"  # submitit's name of task 0's stderr
    bad = sorted((j for j, s in rows.items() if s != "COMPLETED"), key=lambda j: (not log(j).exists(), j))
    if not bad:  # every job completed, yet no manifest: read the last one's log
        return "failed", f"{rec['wait'][-1]} completed without the stage's outputs", log(rec["wait"][-1])
    j = bad[0]
    if log(j).exists():
        return "failed", f"{j} ({rows[j]})", log(j)
    return "cancelled", f"{j} never started (a job it waited for failed, or scancel)", None


def live_jobs(sdir, method):
    """{stage: job ids} of this run's stages (pre, and post of `method`) that earlier submissions left queued or
    running."""
    recs = {st: r for (kind, st), r in read_records(sdir).items() if kind in ("pre", f"post_{method}", *EXTRA)}
    if not recs:
        return {}
    states = slurm_states([j for r in recs.values() for j in r["jobs"]])
    return {st: r["wait"] for st, r in recs.items() if stage_state(r, states)[0] in ("pending", "running")}


def status(logs, pattern=None):
    """[dict(run, kind, stage, status, job, log)] for every run folder in logs whose run name matches pattern
    (a glob, or a substring). A stage is done when its manifest exists; otherwise its recorded jobs decide."""
    logs, runs = Path(logs), {}
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    for d in sorted(logs.glob("*--*")):
        run, kind = d.name.rsplit("--", 1)
        if not d.is_dir() or (pattern and not fnmatch.fnmatchcase(run, pattern)):
            continue
        kinds = runs.setdefault(run, {"pre"})
        if kind == "slurm":
            kinds.update(k for k, _ in read_records(d))
        elif kind.startswith("post_") or kind in EXTRA:
            kinds.add(kind)
    records = {(run, *key): r for run in runs for key, r in read_records(logs / f"{run}--slurm").items()}
    states = slurm_states([j for r in records.values() for j in r["jobs"]]) if records else {}
    rows = []
    for run in sorted(runs):
        for kind in sorted(runs[run], key=lambda k: (k != "pre", k)):
            for stage in PRE if kind == "pre" else (kind,) if kind in EXTRA else POST:
                if (logs / f"{run}--{kind}" / f"{stage}.manifest.json").exists():  # stages.manifest_path
                    st = ("done", "", None)
                elif (run, kind, stage) in records:
                    st = stage_state(records[run, kind, stage], states)
                else:
                    st = ("missing", "", None)
                rows.append(dict(run=run, kind=kind, stage=stage, status=st[0], job=st[1], log=st[2]))
    return rows


def status_main(argv):
    from mucs.cli import Parser

    p = Parser(prog="status.py", description="Each stage of each run folder: done, pending, running, failed (with "
               "the log to read), cancelled or missing.")
    p.add_argument("--logs", help="folder of the run folders (default: paths.logs of the config)")
    p.add_argument("pattern", nargs="?", help="only runs whose name matches this glob or contains this text")
    args = p.parse_args(argv)
    logs = Path(args.logs or C.compose([]).paths.logs)
    rows = status(logs, args.pattern)
    if not rows:
        raise UserError(f"no run folders{f' matching {args.pattern!r}' if args.pattern else ''} in {logs}")
    run = None
    for r in rows:
        if r["run"] != run:
            run = r["run"]
            print(run)
        what = f"job {r['job']}" if r["job"] else ""
        if r["log"]:
            what += f": read {r['log']}"
        print(f"  {r['kind']:14s} {r['stage']:5s} {r['status']:9s} {what}".rstrip())
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
    pre, post = tuple(n for n in names if n in PRE), tuple(n for n in names if n in POST)
    units = []
    for j in jobs:
        for s in seeds:
            if pre:
                units.append(Unit(j, s, methods[0], pre, False))
            units += [Unit(j, s, m, post, bool(pre)) for m in methods if post]
    return units


def parse_list(text, what, choices=None):
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if what == "seeds":
        try:
            spans = [t.partition("-") for t in items]
            items = [v for a, _, b in spans for v in range(int(a), int(b or a) + 1)]
        except ValueError:
            raise UserError(f"--seeds {text!r} must be integers, e.g. 1,2,3 or 1-3")
    bad = [t for t in items if choices is not None and t not in choices]
    if bad or not items:
        raise UserError(f"--{what} {text!r}: unknown {', '.join(map(str, bad)) or 'empty list'}"
                        + (f"; choose from {', '.join(choices)}" if choices else ""))
    return list(dict.fromkeys(items))


def grid_main(argv):
    from mucs import stages as S
    from mucs.cli import Parser, pipeline_args

    p = Parser(prog="launch_grid.py", description="Submit whole pipelines (jobs x seeds x methods) to Slurm, the "
               "pre stages once per (job, seed). Other options as in pipeline.py; key=value are Hydra overrides.")
    p.add_argument("--jobs", required=True, help="comma-separated job presets")
    p.add_argument("--methods", required=True, help="comma-separated attribution methods (random first is usual)")
    p.add_argument("--seeds", required=True, help="comma-separated seeds or ranges, e.g. 1,2,3 or 1-3")
    p.add_argument("--what", default=",".join(S.ORDER), help="stages of each pipeline")
    p.add_argument("--dry_run", action="store_true", help="print the grid; submit nothing")
    args, rest = p.parse_known_args(argv)
    pa, overrides = pipeline_args(rest)
    if pa.job or pa.attrib or pa.seed is not None or pa.shard:
        raise UserError("launch_grid.py takes --jobs, --methods and --seeds (not --job, --attrib, --seed, --shard)")
    overrides = [o for o in overrides if not o.startswith("launcher=")] + ["launcher=slurm"]
    jobs = parse_list(args.jobs, "jobs", C.options("job"))
    methods, seeds = parse_list(args.methods, "methods", C.options("attrib")), parse_list(args.seeds, "seeds")
    units = plan_grid(jobs, methods, seeds, S.parse_what(args.what))
    base = {j: C.compose(overrides + [f"job={j}", f"attrib={methods[0]}"]) for j in jobs}  # checks the overrides
    print(f"grid: {len(jobs)} job(s) x {len(seeds)} seed(s) x {len(methods)} method(s): "
          f"{sum(not u.after_pre for u in units)} + {sum(u.after_pre for u in units)} submissions")
    for u in units:
        base[u.job].seed = u.seed
        kind = "pre" if u.stages[0] in PRE else f"post_{u.method}"
        print(f"  {C.run_name(base[u.job])}  {kind:14s} {','.join(u.stages)}"
              + ("  after pre" if u.after_pre else ""))
    if args.dry_run:
        return 0
    pre_jobs = {}
    for u in units:
        cfg = C.compose(overrides + [f"job={u.job}", f"seed={u.seed}", f"attrib={u.method}"])
        print(f"[slurm] {C.run_name(cfg)} {','.join(u.stages)} (method {u.method})")
        ids = submit_stages(cfg, list(u.stages), overrides + [f"job={u.job}", f"seed={u.seed}", f"attrib={u.method}"],
                            after=pre_jobs.get((u.job, u.seed)) if u.after_pre else None)
        if not u.after_pre:
            pre_jobs[u.job, u.seed] = ids
    print(f"[slurm] follow with: python scripts/status.py --logs {base[jobs[0]].paths.logs}")
    return 0
