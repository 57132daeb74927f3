"""Command lines of pipeline.py and eval.py: flags in the published spelling, the rest Hydra overrides."""
import argparse
import errno
import sys
import traceback

from mucs.errors import UserError


def guard(main):
    """Run main(argv); a UserError or bad argument becomes one line on stderr and exit code 2."""
    def wrapped(argv=None):
        try:
            return main(sys.argv[1:] if argv is None else argv) or 0
        except UserError as e:
            close_progress_bars()  # so the error is the last line, not a bar redrawn after it
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("error: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except MemoryError:
            print("error: out of memory; lower the batch sizes (train.batch, sample.batch, attrib.batch)", file=sys.stderr)
            return 1
        except OSError as e:  # writes outside mucs.io (e.g. a new folder) on a full disk
            if e.errno != errno.ENOSPC:
                raise
            print(f"error: disk full ({e.filename or 'while writing'}); free space and rerun", file=sys.stderr)
            return 2
    return wrapped


def close_progress_bars():
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see --help")

    def parse_overrides(self, argv):
        """(args, the remaining key=value config overrides); an unknown --option is an error."""
        args, rest = self.parse_known_args(argv)
        bad = [r for r in rest if r.startswith("-")]
        if bad:
            raise UserError(f"unknown option {bad[0]}; see --help")
        return args, rest


def pipeline_args(argv):
    p = Parser(prog="pipeline.py", description="Run stages of the counterfactual attribution pipeline. "
               "Extra key=value arguments are Hydra overrides (e.g. train.steps=500).")
    p.add_argument("--what", default="tpre,gpre,a,tpost,gpost",
                   help="comma-separated stages: tpre,gpre,a,tpost,gpost, and lds (the LDS benchmark)")
    p.add_argument("--job", help="job preset in configs/job (dataset + model + recipe)")
    p.add_argument("--seed", "--data_seed", dest="seed", type=int, help="training seed of the job")
    p.add_argument("--attrib", help="attribution method in configs/attrib")
    p.add_argument("--num_attrib", type=int)
    p.add_argument("--control_factor", type=float)
    p.add_argument("--topk_factor", type=float)
    p.add_argument("--subsample", type=int)
    p.add_argument("--device")
    p.add_argument("--use_last_ckpt", action="store_true")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    p.add_argument("--no_exec", action="store_true", help="print the plan of stages with inputs and outputs; run nothing")
    p.add_argument("--launcher", help="local (default) or slurm")
    p.add_argument("--sbatch", action="store_true", help="the published spelling of --launcher=slurm")
    p.add_argument("--shard", help="i/n: attribute only blocks i, i+n, ... of the targets (`a`), or train and measure "
                   "only units i, i+n, ... of the LDS models (`lds`); used by Slurm arrays; -1/n merges")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-")]
    if bad:
        raise UserError(f"unknown option {bad[0]}; see --help (config values are key=value without dashes)")
    over = []
    for key in ("job", "attrib", "launcher"):
        if getattr(args, key):
            over.append(f"{key}={getattr(args, key)}")
    if args.sbatch:
        over.append("launcher=slurm")
    for key in ("seed", "num_attrib", "control_factor", "topk_factor", "subsample", "device"):
        if getattr(args, key) is not None:
            over.append(f"{key}={getattr(args, key)}")
    for key in ("use_last_ckpt", "force"):
        if getattr(args, key):
            over.append(f"{key}=true")
    return args, over + rest


def parse_shard(s):
    if not s:
        return (0, 1)
    try:
        i, n = (int(v) for v in s.split("/"))
        assert n >= 1 and -1 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard {s!r} must be i/n with 0 <= i < n (or -1/n to merge)")
    return (i, n)


def pipeline_main(argv):
    from mucs import config as C
    from mucs import stages as S

    args, overrides = pipeline_args(argv)
    names = S.parse_what(args.what)
    cfg = C.compose(overrides)
    if cfg.launcher.name != "local" and not args.no_exec:  # before Job(): a login node may have no GPU
        if args.shard:
            raise UserError("--shard is what the jobs of a Slurm array run; with --launcher=slurm set "
                            "launcher.a_shards=N (or logo_shards, lds_shards)")
        from mucs.launch import submit
        return submit(cfg, names, overrides)
    job = S.Job(cfg)
    if args.no_exec:
        print_plan(job, names)
        return 0
    S.check_model(job)  # a model that does not fit the dataset is refused before any stage starts
    shard = parse_shard(args.shard)
    if job.world.main:
        print(f"[pipeline] job {cfg.job_name} seed {cfg.seed} method {cfg.attrib.name} on {job.device}"
              f"{f' x {job.world.size} processes' if job.world.size > 1 else ''}; runs in {job.pre.parent}")
    lds_done = "lds" in names and S.is_done(job, S.STAGES["lds"]) and not cfg.force
    for n in names:
        kw = dict(shard=shard) if n in S.SHARDED else {}
        S.run_stage(job, n, will_run=names, **kw)
    if lds_done and job.world.main and (shard[1] == 1 or shard[0] == -1):
        S.lds.show(job)  # skipped as done: its table still takes in the methods attributed since
    return 0


def print_plan(job, names):
    from mucs import config as C
    from mucs import stages as S

    cfg = job.cfg
    print(f"plan for job {cfg.job_name} (seed {cfg.seed}, method {cfg.attrib.name}, device {job.device})")
    meta = S.plan_meta(job)
    size = f"{meta['resolution']}x{meta['resolution']}x{meta['channels']}"
    print(f"  model {cfg.model.net} {dict(cfg.model.net_kwargs)} precond {cfg.model.precond.kind}; "
          f"{S.check_model(job, meta) / 1e6:.2f} M parameters at {size}"
          f"{' (pretrained ' + cfg.pretrained + ')' if cfg.pretrained else ''}")
    t, s = cfg.train, cfg.sample
    print(f"  train batch {t.batch} lr {t.lr} ema {t.ema} steps <= {t.steps}; "
          f"num_gen {C.num_gen(cfg)} (targets {cfg.num_attrib}); num_removal {C.num_removal(cfg)} per target")
    print(f"  recipe: AdamW wd {t.weight_decay}, warm-up {t.warmup_steps} updates, epoch {t.epoch_steps} updates "
          f"(<= {t.steps // t.epoch_steps} epochs), patience {t.patience}, augment p {t.augment_p} "
          f"(label {cfg.model.augment_dim}-d), "
          f"{f'conditional, dropout {t.cond_dropout}' if cfg.model.conditional else 'unconditional'}")
    how = (f"diffusers {s.scheduler or cfg.model.precond.get('scheduler')} {s.num_steps} steps" if s.sampler == "diffusers"
           else f"{s.solver} {s.num_steps} steps, {s.discretization} ladder")
    print(f"  sample: {how}, guidance {s.guidance}, "
          f"{'last' if cfg.use_last_ckpt else 'best'} EMA weights; precision {cfg.precision.autocast}, "
          f"{job.world.size} process(es)")
    if "lds" in names:
        lc = cfg.lds
        print(f"  lds: {lc.num_subsets} subsets of {lc.alpha:.0%} x {lc.num_seeds} seeds = {lc.num_subsets * lc.num_seeds} "
              f"models of {lc.steps or t.steps} updates; {lc.num_noises} fixed noises per query")
    for stage, status, ins, outs in S.plan(job, names):
        print(f"  [{status:4s}] {stage.name:5s} in: {', '.join(ins) or '-'}")
        print(f"               out: {', '.join(outs)}")


run_pipeline = guard(pipeline_main)
