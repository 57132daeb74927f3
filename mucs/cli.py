"""The entry-point layer: the command lines of pipeline.py, eval.py and the scripts (flags in the published
spelling, the rest Hydra overrides), parsed here and handed to the library; a UserError becomes one line."""
import argparse
import errno
import sys
from pathlib import Path

from mucs import config as C
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


def parse_list(text, what, choices=None):
    """The items of a comma-separated --<what> (seeds also as ranges a-b), each one of `choices` if given."""
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


def pipeline_args(argv):
    p = Parser(prog="pipeline.py", description="Run stages of the counterfactual attribution pipeline. "
               "Extra key=value arguments are Hydra overrides (e.g. train.steps=500).")
    p.add_argument("--what", default="tpre,gpre,a,tpost,gpost",
                   help="comma-separated stages: tpre,gpre,a,tpost,gpost, and lds (the LDS benchmark), logo, known "
                   "(the known-answer benchmark)")
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
    from mucs import lds
    from mucs import runner as R
    from mucs import stages as S
    from mucs.manifest import is_done

    args, overrides = pipeline_args(argv)
    names = R.parse_what(args.what)
    cfg = C.compose(overrides)
    if "known" in names:
        from mucs.validate import check_known_sizes
        check_known_sizes(cfg)
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
    lds_done = "lds" in names and is_done(job, R.STAGES["lds"]) and not cfg.force
    for n in names:
        R.run_stage(job, n, will_run=names, shard=shard)
    if lds_done and job.world.main and (shard[1] == 1 or shard[0] == -1):
        lds.show(job)  # skipped as done: its table still takes in the methods attributed since
    return 0


def print_plan(job, names):
    from mucs import runner as R
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
    for stage, status, ins, outs in R.plan(job, names):
        print(f"  [{status:4s}] {stage.name:5s} in: {', '.join(ins) or '-'}")
        print(f"               out: {', '.join(outs)}")


run_pipeline = guard(pipeline_main)


# ---------------------------------------------------------------------------------------------
# eval.py


def eval_args(argv):
    p = Parser(prog="eval.py", description="Counterfactual evaluation: AUC and Ratio against random removal.")
    p.add_argument("--jobs", required=True, help="comma-separated run names <job>_s<seed>_k.._na.._sb.. (globs allowed)")
    p.add_argument("--methods", default=None, help="comma-separated methods; must include random (default random,pixel; "
                   "with --known every method of the runs)")
    p.add_argument("--known", action="store_true", help="the known-answer table of the runs' --what=known instead: "
                   "recall@1, @10, @1%% and MRR per method and case")
    p.add_argument("--metrics", default=None, help="comma list, 'published' or 'all_available' (default: the no-download set)")
    p.add_argument("--calc_ref", action="store_true", help="recompute the per-sample similarities even if cached")
    p.add_argument("--pval", action="store_true", help="show p-values in the printed table")
    p.add_argument("--show_controls", action="store_true", help="show control rows in the printed table and grids")
    p.add_argument("--fn_out", default=None, help="name of the output folder under pointer_to/plots")
    p.add_argument("--logs", default=None, help="folder of the run folders (default: paths.logs of the config)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--allow_unequal", action="store_true", help="evaluate methods that remove another number of ids "
                   "per target than random, or over other targets (refused otherwise); the table marks them")
    return p.parse_overrides(argv)


def out_folder(base, fn_out, prefix, jobs):
    """<paths.plots>/<fn_out>, by default named by the first run and how many were pooled."""
    return Path(base.paths.plots) / (fn_out or f"{prefix}_{jobs[0]}" + (f"_x{len(jobs)}" if len(jobs) > 1 else ""))


def eval_main(argv):
    from mucs.evaluation import evaluate, find_jobs, print_evaluation
    from mucs.metrics import resolve
    from mucs.validate import check_device

    args, overrides = eval_args(argv)
    base = C.compose(overrides)  # for paths.* (logs, cache, plots)
    logs = args.logs or base.paths.logs
    if args.known:
        from mucs.known import known_eval
        methods = args.methods and parse_list(args.methods, "methods", C.options("attrib"))
        jobs = find_jobs(args.jobs, logs)
        known_eval(jobs, logs, out_folder(base, args.fn_out, "known", jobs), methods, not args.no_plots,
                   int(base.known.bootstrap))
        return 0
    methods = parse_list(args.methods or "random,pixel", "methods", C.options("attrib"))
    if "random" not in methods:
        raise UserError("--methods must include random: every method is measured against random removal")
    methods = ["random"] + [m for m in methods if m != "random"]
    resolve(args.metrics)  # an unknown metric is refused before the runs are looked up
    check_device(args.device, "--device")
    jobs = find_jobs(args.jobs, logs)
    res = evaluate(jobs, methods, logs, out_folder(base, args.fn_out, "eval", jobs), args.metrics, base.paths.cache,
                   args.calc_ref, not args.no_plots, args.show_controls, args.device, args.allow_unequal)
    print_evaluation(res, args.pval, args.show_controls)
    return 0


run_eval = guard(eval_main)


# ---------------------------------------------------------------------------------------------
# scripts/launch_grid.py and scripts/status.py (Slurm)


def grid_main(argv):
    from mucs.launch import submit_grid
    from mucs.runner import parse_what
    from mucs.stages import ORDER

    p = Parser(prog="launch_grid.py", description="Submit whole pipelines (jobs x seeds x methods) to Slurm, the "
               "pre stages once per (job, seed). Other options as in pipeline.py; key=value are Hydra overrides.")
    p.add_argument("--jobs", required=True, help="comma-separated job presets")
    p.add_argument("--methods", required=True, help="comma-separated attribution methods (random first is usual)")
    p.add_argument("--seeds", required=True, help="comma-separated seeds or ranges, e.g. 1,2,3 or 1-3")
    p.add_argument("--what", default=",".join(ORDER), help="stages of each pipeline")
    p.add_argument("--dry_run", action="store_true", help="print the grid; submit nothing")
    args, rest = p.parse_known_args(argv)
    pa, overrides = pipeline_args(rest)
    if pa.job or pa.attrib or pa.seed is not None or pa.shard:
        raise UserError("launch_grid.py takes --jobs, --methods and --seeds (not --job, --attrib, --seed, --shard)")
    overrides = [o for o in overrides if not o.startswith("launcher=")] + ["launcher=slurm"]
    jobs = parse_list(args.jobs, "jobs", C.options("job"))
    methods, seeds = parse_list(args.methods, "methods", C.options("attrib")), parse_list(args.seeds, "seeds")
    return submit_grid(jobs, methods, seeds, parse_what(args.what), overrides, args.dry_run)


def status_main(argv):
    from mucs.slurm_status import print_status

    p = Parser(prog="status.py", description="Each stage of each run folder: done, pending, running, failed (with "
               "the log to read), cancelled or missing.")
    p.add_argument("--logs", help="folder of the run folders (default: paths.logs of the config)")
    p.add_argument("pattern", nargs="?", help="only runs whose name matches this glob or contains this text")
    args = p.parse_args(argv)
    if args.logs and not Path(args.logs).is_dir():
        raise UserError(f"--logs {args.logs} is not a folder; pass the folder of the run folders (paths.logs)")
    return print_status(args.logs or C.compose([]).paths.logs, args.pattern)


# ---------------------------------------------------------------------------------------------
# scripts/guda_eval.py and scripts/guda_sweep.py (group attribution)


def group_eval_main(argv):
    from mucs.evaluation import find_jobs
    from mucs.logo import group_eval

    p = Parser(prog="guda_eval.py", description="Group attribution against the LOGO ground truth: Top-1, MRR, NDCG@3, "
               "Top-3 overlap, RBO (p 0.9), Spearman, averaged over queries; GUDA's speed-up over LOGO.")
    p.add_argument("--jobs", required=True, help="comma-separated run names <job>_s<seed>_k.._na.._sb.. (globs allowed)")
    p.add_argument("--methods", default="guda,random,pixel", help="methods with finished `a` runs; instance methods "
                   "are aggregated to groups")
    p.add_argument("--aggregate", default="mean", choices=("sum", "mean", "max"), help="sum, mean or max: an instance "
                   "method's item scores -> group scores (GUDA's own are exact)")
    p.add_argument("--fn_out", default=None, help="name of the output folder under pointer_to/plots")
    p.add_argument("--logs", default=None, help="folder of the run folders (default: paths.logs of the config)")
    args, rest = p.parse_overrides(argv)
    base = C.compose(rest)
    logs = args.logs or base.paths.logs
    methods = parse_list(args.methods, "methods", C.options("attrib"))
    return group_eval(base.paths.plots, logs, find_jobs(args.jobs, logs), methods, args.aggregate, args.fn_out)


def sweep_main(argv):
    from mucs.logo import sweep_variants

    p = Parser(prog="guda_sweep.py", description="GUDA settings compared on one run's gpre samples by the label "
               "proxy: how often a sample's own class is its top group, and its mean rank; where the run's LOGO is "
               "done, also Top-1 and MRR against LOGO on the targets. Extra key=value arguments are overrides.")
    p.add_argument("--job", default="digits_dit_edm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variants", required=True, help="';'-separated variants, each space-separated overrides, e.g. "
                   "'attrib.alpha=0.03;attrib.alpha=1.0 attrib.epochs=50'")
    p.add_argument("--fn_out", default=None, help="name of the output folder under pointer_to/plots")
    args, rest = p.parse_overrides(argv)
    base = [f"job={args.job}", f"seed={args.seed}", "attrib=guda"] + rest
    variants = [(v, C.compose(base + v.split())) for v in (v.strip() for v in args.variants.split(";"))]
    return sweep_variants(variants, args.fn_out)
