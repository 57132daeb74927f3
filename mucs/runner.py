"""Running stages in this process: which stages a --what names, the plan, and one stage run under its run
folder's lock, skipped when done, its progress recorded and its manifest written when it finishes."""
import contextlib
import time

from mucs import lds, logo  # noqa: F401  (each adds its stage to the registry)
from mucs import manifest as M
from mucs.errors import UserError
from mucs.lock import LOCK, FolderLock
from mucs.stages import STAGES


def parse_what(what):
    names = [w.strip() for w in str(what).split(",") if w.strip()]
    bad = [w for w in names if w not in STAGES]
    if bad or not names:
        raise UserError(f"unknown stage {', '.join(bad) or repr(what)} in --what; stages are {','.join(STAGES)}")
    return [s for s in STAGES if s in names]


def plan(job, names):
    """[(stage, status, inputs, outputs)] in pipeline order; status is 'done', 'run' or 'redo'."""
    rows = []
    for n in names:
        s = STAGES[n]
        status = "done" if M.is_done(job, s) else "run"
        if status == "done" and job.cfg.force:
            status = "redo"
        rows.append((s, status, [str(p) for p, _ in s.inputs(job)], [str(s.folder(job) / o) for o in s.outputs]))
    return rows


def stage_lock(job, stage, shard=(0, 1)):
    """The lock of the stage's run folder (rank 0 holds it for a data-parallel world). Shards i/n of a sharded
    stage run side by side, each under a lock of its own."""
    if not job.world.main:
        return contextlib.nullcontext()
    sharded = stage.sharded and shard[1] > 1 and shard[0] >= 0
    name = f"{LOCK}-{stage.name}{shard[0]}of{shard[1]}" if sharded else LOCK
    return FolderLock(stage.folder(job), job.cfg.get("lock_wait", 0) or 0, what=f"stage {stage.name}", name=name)


def check_ready(job, s, will_run):
    """The run folders were made with the current settings, and every input is there (or will be) and current."""
    M.check_saved_config(job, job.pre, "tpre", will_run)
    if s.folder(job) != job.pre:
        M.check_saved_config(job, s.folder(job), "a" if s.folder(job) == job.post else s.name, will_run)
    M.check_inputs(job, s, will_run)


def run_stage(job, name, will_run=(), shard=(0, 1)):
    s = STAGES[name]
    check_ready(job, s, will_run)
    with stage_lock(job, s, shard):
        job.world.barrier()  # the others look at the folder once rank 0 holds it
        run_locked(job, s, shard)


def prepare_stage(job, name, will_run=()):
    """The work the shards of a sharded stage share (Stage.prepare), done once before they start (a Slurm job of its
    own ahead of the array); nothing when the stage is done."""
    s = STAGES[name]
    check_ready(job, s, will_run)
    if M.is_done(job, s) and not job.cfg.force or not job.world.main:
        return
    t0 = time.time()
    with FolderLock(s.folder(job), job.cfg.get("lock_wait", 0) or 0, what=f"the shared work of {name}",
                    name=f"{LOCK}-{name}-prepare"):
        s.prepare(job)
    print(f"[{name}] shared work done in {time.time() - t0:.1f} s; its shards read it")


def run_locked(job, s, shard=(0, 1)):
    name, part = s.name, s.sharded and shard[1] > 1 and shard[0] != -1  # a shard's manifest is the merge's
    if M.is_done(job, s) and not job.cfg.force:
        M.check_record(job, s)
        print(f"[{name}] done already ({M.manifest_path(job, s)}); skipping (--force redoes it)")
        return
    t0 = time.time()
    if job.world.main:
        s.folder(job).mkdir(parents=True, exist_ok=True)
        if job.cfg.force:
            clear_progress(job, s, shard)
        inputs = M.start_progress(job, s)
    job.world.barrier()  # the others start from what rank 0 cleared
    if job.world.main or s.data_parallel:
        s.run(job, shard)
    if job.world.main and not part:
        M.write_manifest(job, s, time.time() - t0, inputs)
        M.progress_path(job, s).unlink(missing_ok=True)
        if s.finish:
            s.finish(job)
        print(f"[{name}] done in {time.time() - t0:.1f} s -> {s.folder(job)}")
    job.world.barrier()  # the next stage reads this one's outputs


def clear_progress(job, s, shard=(0, 1)):
    """--force: forget resumable progress of this stage so it is recomputed (outputs are replaced atomically)."""
    if s.clear:
        s.clear(job, shard)
    M.progress_path(job, s).unlink(missing_ok=True)
    M.manifest_path(job, s).unlink(missing_ok=True)

