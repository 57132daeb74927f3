"""Slurm's view of the stages a submission (mucs.launch) left: the record per stage, in
`<logs>/<run>--slurm/records/<pre|post_m|lds|logo>.<stage>.json` (its job ids and log folder), and the states of
those jobs from sacct and squeue. The status command reads them, and a later submission waits for a stage's live
job instead of submitting the stage twice.
"""
import fnmatch
import subprocess
from pathlib import Path

from mucs import config as C
from mucs.errors import UserError
from mucs.io import read_json
from mucs.runner import STAGES

WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
LIVE = WAITING | {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


def kind_of(stage, method):
    """The run folder a stage writes: <run>--pre, <run>--post_<method>, or its own (<run>--logo, <run>--lds)."""
    kind = STAGES[stage].kind
    return f"post_{method}" if kind == "post" else kind


def stages_of(kind):
    """The stages that write a run folder of this kind (pre, post_<method>, or a stage's own)."""
    kind = "post" if kind.startswith("post_") else kind
    return tuple(n for n, s in STAGES.items() if s.kind == kind)


def own_kinds():
    """Kinds of the stages with a run folder of their own (lds, logo)."""
    return tuple(s.kind for s in STAGES.values() if s.kind not in ("pre", "post"))


def slurm_dir(cfg):
    return Path(cfg.paths.logs) / f"{C.run_name(cfg)}--slurm"


def record_path(sdir, kind, stage):
    return Path(sdir) / "records" / f"{kind}.{stage}.json"


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
    recs = {st: r for (kind, st), r in read_records(sdir).items() if kind in ("pre", f"post_{method}", *own_kinds())}
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
        elif kind.startswith("post_") or kind in own_kinds():
            kinds.add(kind)
    records = {(run, *key): r for run in runs for key, r in read_records(logs / f"{run}--slurm").items()}
    states = slurm_states([j for r in records.values() for j in r["jobs"]]) if records else {}
    rows = []
    for run in sorted(runs):
        for kind in sorted(runs[run], key=lambda k: (k != "pre", k)):
            for stage in stages_of(kind):
                if (logs / f"{run}--{kind}" / f"{stage}.manifest.json").exists():  # manifest.manifest_path
                    st = ("done", "", None)
                elif (run, kind, stage) in records:
                    st = stage_state(records[run, kind, stage], states)
                else:
                    st = ("missing", "", None)
                rows.append(dict(run=run, kind=kind, stage=stage, status=st[0], job=st[1], log=st[2]))
    return rows


def print_status(logs, pattern=None):
    """scripts/status.py: every stage of the matching run folders, with its job and the log to read."""
    rows = status(logs, pattern)
    if not rows:
        raise UserError(f"no run folders{f' matching {pattern!r}' if pattern else ''} in {logs}")
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
