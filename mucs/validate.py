"""What every setting may be, checked once for every entry point: config.compose calls `check` on each config it
composes, so pipeline.py, eval.py, the scripts, a Slurm submission (before anything is submitted) and each Slurm
job refuse a bad value in one line (key, value, allowed range, fix) before any work, with nothing written.

Sizes that depend on the data (removal and subsample against the training split, samples against the test split)
are checked against the split files' headers, or before a bundled dataset is built against data.expect.sizes.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import ListConfig

from mucs.errors import UserError
from mucs.nets import NAMES as NETS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def options(group):
    """The choices of a config group: the names of its files in configs/<group>/."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@dataclass(frozen=True)
class Rule:
    """Allowed values: numbers in [lo, hi] (an open end when lo_open / hi_open; integers only when integer), one of
    `choices`, an existing `path`, or (with `null`) also null. `words` names the key for a message."""
    words: str
    lo: float = None
    hi: float = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    choices: tuple = ()
    path: bool = False
    null: bool = False
    also: tuple = ()  # values allowed besides the range (e.g. "auto")
    pair: bool = False  # a part [lo, hi] of a range, lo <= hi, each allowed
    many: bool = False  # a list (or null, with `null`) whose every value is allowed

    def allows(self, v):
        if self.pair:
            return len(v) == 2 and v[0] <= v[1] and all(self.single(t) for t in v)
        if self.many:
            return v is None and self.null or isinstance(v, (list, tuple, ListConfig)) and all(
                self.single(t) for t in v)
        return self.single(v)

    def single(self, v):
        if v is None:
            return self.null
        if v in self.also or self.path and Path(str(v)).exists():
            return True
        if self.choices:
            return any(v == c and type(v) is type(c) for c in self.choices)  # true is not 1
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.integer and v != int(v)):
            return False
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return math.isfinite(v) and lo_ok and hi_ok

    def range(self):
        if self.pair:
            return f"[lo, hi] with lo <= hi, each {Rule(self.words, self.lo, self.hi).range()}"
        if self.many:
            each = Rule(self.words, self.lo, self.hi, self.lo_open, self.hi_open, self.integer).range()
            return f"a list of {each.replace('an integer', 'integers').replace('a number', 'numbers')}" + (
                " or null" if self.null else "")
        if self.path:
            return "an existing file or folder"
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        parts = [f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "",
                 f"{'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else ""]
        r = f"{'an integer' if self.integer else 'a number'} {' and '.join(p for p in parts if p)}".strip()
        return r + "".join(f" or {a}" for a in self.also) + (" or null" if self.null else "")


def count(words, lo=1, **kw):
    return Rule(words, lo=lo, integer=True, **kw)


def positive(words, **kw):
    return Rule(words, lo=0, lo_open=True, **kw)


def nonneg(words, **kw):
    return Rule(words, lo=0, **kw)


def probability(words):
    return Rule(words, lo=0, hi=1)


def one_of(words, *choices):
    return Rule(words, choices=choices)


def switch(words):
    return Rule(words, choices=(True, False))


def ladder_part(words):
    return Rule(words, lo=0, hi=1, pair=True)


SEED = count("a seed", lo=0)
RULES = {
    "seed": SEED, "num_attrib": count("the number of targets"),
    "control_factor": nonneg("controls per target"), "topk_factor": positive("the removal factor (num_removal = "
                                                                             "data.num_removal_base x topk_factor)"),
    "num_removal": count("the ids removed per target", null=True), "subsample": count("the training subsample", lo=0),
    "lock_wait": nonneg("seconds to wait for a run folder's lock"), "use_last_ckpt": switch("a switch"),
    "force": switch("a switch"), "targets": Rule("the user's targets", path=True, null=True),
    "data.num_removal_base": positive("the removal base"),
    "precision.autocast": one_of("mixed precision", "none", "bf16", "fp16"),
    "precision.tf32": switch("a switch"), "precision.score_tf32": switch("a switch"),
    "tpost.mode": one_of("how tpost trains (retrain from scratch is the protocol's)", "retrain", "finetune"),
    "model.net": one_of("the network", *NETS),
    "model.precond.kind": one_of("the preconditioning", "edm", "vp", "ddpm"),
    "train.steps": count("training updates"), "train.batch": count("the training batch"),
    "train.lr": positive("the learning rate"), "train.weight_decay": nonneg("the weight decay"),
    "train.warmup_steps": count("warm-up updates", lo=0), "train.ema": Rule("the EMA decay", lo=0, hi=1, hi_open=True),
    "train.epoch_steps": count("updates per epoch"), "train.patience": count("epochs of patience"),
    "train.ckpt_every": count("updates between training states"), "train.cond_dropout": probability("a probability"),
    "train.augment_p": probability("a probability"), "train.val_items": count("validation items"),
    "sample.sampler": one_of("the sampler", "heun", "diffusers"), "sample.num_steps": count("sampler steps", lo=2),
    "sample.sigma_min": positive("the lowest noise level"), "sample.sigma_max": positive("the highest noise level"),
    "sample.rho": positive("the ladder's rho"), "sample.discretization": one_of("the ladder", "edm", "vp"),
    "sample.solver": one_of("the solver", "heun", "euler"), "sample.S_churn": nonneg("the churn"),
    "sample.S_min": nonneg("a noise level"), "sample.S_max": nonneg("a noise level"),
    "sample.S_noise": nonneg("the churn noise"), "sample.guidance": nonneg("the guidance weight"),
    "sample.batch": count("the sampling batch"), "sample.surplus": Rule("the candidates per sample", lo=1),
    "groups.source": one_of("where groups come from", "label", "table"),
    "groups.score.num_noises": count("noises"), "groups.score.noise_seed": SEED,
    "groups.score.t_range": ladder_part("a part of the ladder"), "groups.score.condition": switch("a switch"),
    "groups.score.batch": count("a batch"),
    "lds.alpha": Rule("the fraction of the training split in a subset", lo=0, hi=1, lo_open=True, hi_open=True),
    "lds.num_subsets": count("subsets", lo=2), "lds.num_seeds": count("seeds per subset"), "lds.subset_seed": SEED,
    "lds.steps": count("training updates", null=True), "lds.num_noises": count("noises"),
    "lds.t_range": ladder_part("a part of the ladder"), "lds.noise_seed": SEED, "lds.eval_batch": count("a batch"),
    "lds.bootstrap": count("bootstrap resamples"),
    "known.copies.num_items": count("training items given back", lo=0), "known.copies.item_seed": SEED,
    "known.copies.ids": count("training ids", lo=0, null=True, many=True),
    "known.copies.noise": positive("noise levels", many=True),
    "known.copies.shift": count("shifts in pixels", many=True),
    "known.copies.jpeg": count("JPEG qualities", hi=100, many=True),
    "known.custom.num_exemplars": count("exemplars", lo=0), "known.custom.exemplar_seed": SEED,
    "known.custom.images": Rule("the user's exemplars", path=True, null=True),
    "known.custom.label": count("a class", lo=0), "known.custom.steps": count("fine-tune updates"),
    "known.custom.share": Rule("the exemplar's share of the fine-tune set", lo=0, hi=1, lo_open=True, hi_open=True),
    "known.custom.ema": Rule("the fine-tune's EMA decay", lo=0, hi=1, hi_open=True, null=True),
    "known.custom.num_samples": count("samples per exemplar"), "known.custom.sample_seed": SEED,
    "known.bootstrap": count("bootstrap resamples"),
}
T_RANGE = {"t_range": ladder_part("a part of the ladder")}
ATTRIB = {  # per method, the keys of attrib.*
    "mucs": {"lr_factor": positive("the learning-rate divisor"), "weight_decay": nonneg("the weight decay"),
             "lam": nonneg("lambda"), "num_noises": count("noises"), "null_batches": count("batches"),
             "L_null": positive("the clamp of the generated loss", also=("auto",)),
             "tolerance": Rule("the stop tolerance (goal (1 - tolerance) L_null)", hi=1, hi_open=True),
             "max_steps": count("a step cap", lo=0, null=True), "safety_steps": count("a step guard"),
             "augment": switch("a switch"), "t_sched_infer": Rule("a fraction of the ladder", lo=0, hi=1, lo_open=True),
             "consistent_noise": switch("a switch"), "score": one_of("the skew", "ratio", "diff"),
             "eps": nonneg("epsilon"), "noise_seed": SEED, "eval_batch": count("(item, noise) pairs", also=("auto",)),
             "compile": switch("a switch"), "eval_autocast": one_of("mixed precision", "none", "bf16", "fp16"),
             "channels_last": switch("a switch"),
             "instance_weighting": one_of("the unlearning's instance weights", "none", "inverse_loss"),
             "adaptive": switch("a switch"), "adaptive_blocks": count("blocks of the fixed noises"),
             "adaptive_alpha": Rule("the pruning's error rate", lo=0, hi=1, lo_open=True, hi_open=True),
             "adaptive_keep": Rule("candidates per removed id", lo=1), "adaptive_prior_dof": nonneg("prior degrees")},
    "dtrak": {"output": one_of("the output function", "loss", "square", "square_D", "l1", "l2", "mean"),
              "num_timesteps": count("noise levels"), **T_RANGE, "noise_seed": SEED,
              "proj": one_of("the projection", "gaussian", "rademacher", "identity"),
              "proj_dim": count("the projection size"), "proj_seed": SEED, "lam": nonneg("lambda"),
              "grad_batch": count("a batch"), "proj_batch": count("a batch")},
    "abu": {"lr": positive("the step size"), "steps": count("ascent steps", lo=0), "grad_samples": count("noise draws"),
            "damping": nonneg("the damping"), "fisher_epochs": count("passes"), "num_noises": count("noises"),
            **T_RANGE, "noise_seed": SEED, "grad_batch": count("a batch"), "eval_batch": count("a batch")},
    "guda": {"objective": one_of("the objective", "redirect", "ascent"), "lr": positive("the learning rate"),
             "weight_decay": nonneg("the weight decay"), "alpha": nonneg("the forget weight"),
             "epochs": count("passes"), "pairs": count("forget items"), "neighbours": count("neighbours"),
             "trust": positive("the trust radius"), "batch": count("a batch"), "common_noise": switch("a switch")},
    "kernel": {"kernel": one_of("the kernel", "gaussian", "laplace"), "tau_factor": positive("the Laplace width"),
               "num_levels": count("noise levels", null=True), **T_RANGE,
               "aggregate": one_of("the aggregate", "mean", "logmean"), "condition": switch("a switch")},
    "pixel": {"distance": one_of("the distance", "l2", "cosine")},
    "cond": {"tie_break": nonneg("the tie-break scale")},
    "ensemble": {"mode": one_of("the normalisation", "rank", "zscore")},
    **{m: {"batch": count("a batch")} for m in ("clip", "dino", "sscd")},
}
ATTRIB["das"] = dict(ATTRIB["dtrak"], residual=one_of("the residual", "released", "rms", "none"),
                     square=switch("a switch"), eval_batch=count("a batch"))
ATTRIB["ekfac"] = ATTRIB["kfac"] = {
    "strategy": one_of("kronfluence's curvature", "ekfac", "kfac", "diagonal", "identity"),
    "measurement": one_of("the measurement", "loss", "elbo"), "num_draws": count("(sigma, noise) draws"),
    "noise_seed": SEED, "empirical_fisher": switch("a switch"),
    "damping": nonneg("the damping (null: kronfluence's heuristic)", null=True),
    "query_rank": count("the rank of the query gradients", null=True), "batch": count("a batch")}
ATTRIB["journey_trak"] = dict({k: v for k, v in ATTRIB["dtrak"].items() if k not in ("num_timesteps", "t_range")},
                              steps=count("attributed sampler steps", null=True),
                              anchor=one_of("where a step's output is taken", "x0_hat", "trajectory"),
                              noises=count("noises per step"),
                              aggregate=one_of("the aggregate over steps", "zscore", "rank", "mean"))
LAUNCHER = {"a_shards": count("array tasks"), "lds_shards": count("array tasks"),
            "logo_shards": count("array tasks (0: one per group)", lo=0), "array_parallelism": count("tasks at once"),
            "max_num_timeout": count("requeues", lo=0), "timeout_min": count("minutes", null=True),
            "cpus_per_task": count("CPUs", null=True), "tasks_per_node": count("tasks", null=True),
            "gpus_per_node": count("GPUs", lo=0, null=True), "mem_gb": positive("GB", null=True)}
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


MISSING = object()


def get(cfg, key):
    v = cfg
    for p in key.split("."):
        if v is None or p not in v:
            return MISSING
        v = v[p]
    return v


def refuse(key, value, rule, why=None):
    flag = f"--{key} or " if key in ("seed", "num_attrib", "control_factor", "topk_factor", "subsample") else ""
    raise UserError(f"{key}={value!r} is not allowed: {why or rule.words} must be {rule.range()}; set {flag}{key} "
                    f"to such a value")


def check_rules(cfg, rules, prefix=""):
    for key, rule in rules.items():
        v = get(cfg, prefix + key)
        if v is not MISSING and not rule.allows(v):
            refuse(prefix + key, list(v) if rule.pair else v, rule)


def check(cfg, num_removal, num_gen):
    """Refuse the first setting of `cfg` outside its allowed values (one UserError naming key, value, range and fix).
    num_removal, num_gen: the derived sizes (config.num_removal, config.num_gen)."""
    check_rules(cfg, RULES)
    check_rules(cfg, ATTRIB.get(cfg.attrib.name, {}), "attrib.")
    if cfg.launcher.name == "slurm":
        check_rules(cfg, LAUNCHER, "launcher.")
        for stage, own in (cfg.launcher.get("stages") or {}).items():
            check_rules(cfg, {k: r for k, r in LAUNCHER.items() if k in own}, f"launcher.stages.{stage}.")
    check_device(cfg.device)
    if cfg.sample.sigma_max <= cfg.sample.sigma_min:
        raise UserError(f"sample.sigma_max={cfg.sample.sigma_max} must be above sample.sigma_min="
                        f"{cfg.sample.sigma_min}; raise sigma_max or lower sigma_min")
    if cfg.groups.source == "table" and not (cfg.groups.table and Path(str(cfg.groups.table)).exists()):
        raise UserError(f"group table {cfg.groups.table} does not exist; groups.source=table needs groups.table=<path "
                        f"of a CSV with columns id,group>")
    if cfg.attrib.name == "ensemble":
        check_ensemble(cfg.attrib)
    if "known" in cfg:
        check_known(cfg.known)
    check_sizes(cfg, num_removal, num_gen)


def check_device(device, key="device"):
    if not DEVICE.fullmatch(str(device)):
        raise UserError(f"{key}={device!r} is not a device: it must be auto, cpu, cuda, cuda:N or mps; set {key} "
                        f"(--device) to one of them")


def check_ensemble(a):
    """Its methods are named (whether their saved scores exist is the attribution's first check)."""
    methods = list(a.methods or [])
    if not methods or "ensemble" in methods:
        raise UserError(f"attrib.methods={methods} must list other methods whose scores to combine, e.g. "
                        f"attrib.methods=[pixel,kernel]")
    if a.weights is not None and (len(a.weights) != len(methods) or not all(nonneg("").allows(w) for w in a.weights)):
        raise UserError(f"attrib.weights={list(a.weights)} must be one number >= 0 per method of attrib.methods "
                        f"({len(methods)}), or null for equal weights")


def check_known(k):
    """Its methods are registered ones (or all), and it has something to measure."""
    methods = k.methods
    if methods != "all" and not (isinstance(methods, ListConfig) and methods and set(methods) <= set(options("attrib"))):
        raise UserError(f"known.methods={methods!r} is not allowed: it must be all or a list of methods from "
                        f"{', '.join(options('attrib'))}; set known.methods to such a value")
    if k.copies.num_items == 0 and not k.copies.ids and k.custom.num_exemplars == 0 and not k.custom.images:
        raise UserError("known.copies.num_items=0 and known.custom.num_exemplars=0 leave the known-answer benchmark "
                        "nothing to measure; set one of them above 0")


def check_sizes(cfg, num_removal, num_gen):
    """The sizes that depend on the dataset: against its split files, or data.expect.sizes before it is built."""
    from mucs.data import split_sizes

    sizes = split_sizes(cfg.data.folder, cfg.data.get("expect"))
    n_train, n_test = sizes.get("train"), sizes.get("test")
    if n_train is not None:
        if cfg.subsample > n_train:
            raise UserError(f"subsample={cfg.subsample} is not allowed: the training subsample must be an integer in "
                            f"[0, {n_train}] (0: the whole training split of {n_train} items); set --subsample or "
                            f"subsample to such a value")
        n = cfg.subsample or n_train
        if not 1 <= num_removal < n:
            raise UserError(f"num_removal {num_removal} is not smaller than the training set ({n} items): the ids "
                            f"removed per target must be in [1, {n - 1}]; lower --topk_factor (num_removal = "
                            f"{cfg.data.num_removal_base} x topk_factor) or set num_removal")
    if n_test is not None and num_gen > n_test:
        raise UserError(f"num_attrib={cfg.num_attrib} with control_factor={cfg.control_factor} asks for {num_gen} "
                        f"samples but the test split has {n_test} items (one seed each); lower --num_attrib or "
                        f"--control_factor")


def check_known_sizes(cfg):
    """The known-answer benchmark's sizes against the data, checked when --what names the known stage (a job whose
    stages do not include it is not refused for them)."""
    from mucs.data import split_sizes

    sizes = split_sizes(cfg.data.folder, cfg.data.get("expect"))
    n_train, n_test, known = sizes.get("train"), sizes.get("test"), cfg.known
    if n_train is not None and known.copies.num_items > (cfg.subsample or n_train):
        raise UserError(f"known.copies.num_items={known.copies.num_items} is not allowed: the training items given "
                        f"back must be at most the {cfg.subsample or n_train} training items; lower it")
    if n_test is not None and not known.custom.images and known.custom.num_exemplars > n_test:
        raise UserError(f"known.custom.num_exemplars={known.custom.num_exemplars} is not allowed: the exemplars are "
                        f"held-out items, at most the {n_test} of the test split; lower it")
