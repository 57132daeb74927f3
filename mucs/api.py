"""The Python API: attribution from a notebook, on a model and data in memory, over the same code as the CLI.

    import mucs
    d = mucs.load("pointer_to/logs/digits_dit_edm_s1_k2.0_na20_sb0--pre")   # a trained run, or a diffusers folder
    s = mucs.attribute(d, train="pointer_to/data/digits", targets=images, method="mucs", num_noises=16)
    s.top(10)                                                                # [targets, 10] training ids

`attribute` runs the registered method through `mucs.attrib.base.attribute` (the runner of `pipeline.py
--what=a`), so on the same model, training split and targets its scores equal the CLI's bit for bit.
`counterfactual` runs the five stages through `mucs.runner.run_stage`, `evaluate` and `report` the evaluation
and the HTML report of `eval.py` and `report.py`. Bad input raises `mucs.UserError` with the CLI's one-line messages.
"""
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mucs import config as C
from mucs.errors import UserError

__all__ = ["Denoiser", "Scores", "load", "attribute", "run", "counterfactual", "evaluate", "report"]


@dataclass
class Denoiser:
    """A trained denoiser D(x, sigma, labels) with what attribution needs besides its weights: the config it was
    made with (model, training recipe, sampler, seed), the dataset's meta (resolution, channels, classes), and
    the run folder whose weights it holds (caches such as MUCS's L_orig are shared with the CLI there)."""

    D: torch.nn.Module
    cfg: DictConfig
    meta: dict
    folder: Path | None = None

    def __call__(self, x, sigma, labels=None):
        return self.D(x, sigma, labels)


@dataclass
class Scores:
    """scores[t, j]: how much training item `train_ids[j]` is responsible for target t (higher = more)."""

    scores: torch.Tensor
    train_ids: torch.Tensor
    method: str

    def top(self, k: int) -> torch.Tensor:
        """The ids of the k highest-scoring training items of every target, [targets, k], highest first (ties by
        position, as the CLI's top ids)."""
        order = torch.argsort(self.scores, dim=1, descending=True, stable=True)[:, : int(k)]
        return self.train_ids[order]


def _device(device):
    from mucs.stages import resolve_device
    return resolve_device(device)


def load(path, device: str = "auto", use_last_ckpt: bool = False, job: str = "digits_ddpm",
         num_classes: int | None = None) -> Denoiser:
    """A trained model: a run folder of pipeline.py (`<run>--pre` or `<run>--post_<method>`, its EMA weights) or a
    local diffusers pipeline/model folder, loaded by diffusers. For a diffusers folder `job` gives the training
    recipe and sampler settings that methods read (its dataset is not used), and `num_classes` the classes of a
    class-conditional UNet (default: num_class_embeds - 1, the last row being "no condition" as the toolkit
    saves them). Returns a frozen Denoiser in eval mode on `device`."""
    from mucs.data import load_meta
    from mucs.model import build_denoiser, load_denoiser

    path, dev = Path(path), _device(device)
    if (path / "config.yaml").exists() and (path / "model-best.safetensors").exists():
        cfg = C.load_saved(path / "config.yaml")
        with open_dict(cfg):
            cfg.use_last_ckpt = bool(use_last_ckpt)
        weights = path / ("model-last.safetensors" if use_last_ckpt else "model-best.safetensors")
        meta = load_meta(cfg.data.folder) if (Path(cfg.data.folder) / "meta.json").exists() else dict(cfg.data.expect)
        pre = path if path.name.endswith("--pre") else path.with_name(path.name.rsplit("--", 1)[0] + "--pre")
        return Denoiser(load_denoiser(cfg.model, meta, weights, dev), cfg, meta, pre if pre.exists() else None)
    from mucs.diffusers_adapter import load_pretrained

    cfg = C.compose([f"job={job}", f"pretrained={path}"])  # a UserError naming what is wrong with the folder
    k = cfg.model.net_kwargs
    if num_classes is None:
        num_classes = (k.get("num_class_embeds") or 1) - 1 if cfg.model.net == "diffusers_unet" else k.get("num_embeds_ada_norm")
    meta = dict(resolution=int(k.sample_size), channels=int(k.in_channels), cond_dim=0,
                cond="class" if cfg.model.conditional else "none", num_classes=int(num_classes or 0))
    D = build_denoiser(cfg.model, meta)
    D.net.model.load_state_dict(load_pretrained(path).state_dict())
    return Denoiser(D.to(dev).eval().requires_grad_(False), cfg, meta, None)


def _train_split(train, train_labels, train_ids, meta):
    """A Split of the training items: a stored dataset folder's train split, or images in [-1, 1] in memory."""
    from mucs.data import Split, load_split

    if isinstance(train, (str, Path)):
        return load_split(train, "train")
    x = _images(train, meta, "train")
    n = len(x)
    ids = torch.arange(n) if train_ids is None else torch.as_tensor(train_ids, dtype=torch.long)
    labels = torch.full((n,), -1, dtype=torch.long) if train_labels is None else torch.as_tensor(train_labels).long()
    if len(ids) != n or len(labels) != n or len(ids.unique()) != n:
        raise UserError(f"train has {n} images but {len(ids)} ids (unique: {len(ids.unique())}) and {len(labels)} labels; "
                        f"give one unique id and one label per image")
    return Split(x, ids, labels)


def _images(x, meta, what):
    """Images [N, C, H, W] in [-1, 1] that fit the model (checked as the CLI checks user targets)."""
    if not torch.is_tensor(x):
        raise UserError(f"{what} must be a tensor of images [N, C, H, W] in [-1, 1], a dataset folder or PNG paths")
    want = (meta["channels"], meta["resolution"], meta["resolution"])
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise UserError(f"{what} images have shape {tuple(x.shape)}, the model needs [N, {', '.join(map(str, want))}]")
    if not torch.isfinite(x).all() or x.min() < -1 or x.max() > 1:
        raise UserError(f"{what} images have values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; scale them to "
                        f"[-1, 1] (x / 127.5 - 1 for uint8)")
    return x.float()


def _targets(targets, meta):
    from mucs.generate import load_user_targets

    if isinstance(targets, (str, Path)):
        return load_user_targets(targets, meta)
    if isinstance(targets, (list, tuple)) and targets and isinstance(targets[0], (str, Path)):
        folder = Path(tempfile.mkdtemp(prefix="mucs-targets-"))
        try:
            for i, p in enumerate(targets):
                if not Path(p).is_file():
                    raise UserError(f"target {p} is not a file; give PNG paths, a folder of PNGs or a tensor")
                shutil.copy(p, folder / f"{i:06d}.png")
            return load_user_targets(folder, meta)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return _images(targets, meta, "targets")


def method_config(cfg, method, overrides):
    """The model's config with attrib = `configs/attrib/<method>.yaml` resolved against it (its job's scaling under
    job_attrib, as pipeline.py composes it) and the method's keys overridden: same names, kinds and defaults."""
    if method not in C.options("attrib"):
        raise UserError(f"unknown attribution method {method!r}; choose from {', '.join(C.options('attrib'))}")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.attrib = OmegaConf.load(C.CONFIGS / "attrib" / f"{method}.yaml")
        OmegaConf.resolve(cfg)
        for k, v in overrides.items():
            if k not in cfg.attrib:
                raise UserError(f"unknown key {k!r} for method {method}; its keys are {', '.join(cfg.attrib)}")
            C.check_kind(f"{k}={v}", cfg.attrib[k], v)
            cfg.attrib[k] = v
    return cfg


def attribute(denoiser: Denoiser, train, targets, method: str = "mucs", *, train_labels=None, train_ids=None,
              target_labels=None, num_removal: int | None = None, work_dir=None, device: str = "auto",
              **overrides) -> Scores:
    """Scores of every training item for every target with a registered method.

    train: a stored dataset folder (its train split, as the CLI uses it) or images [N, C, H, W] in [-1, 1] with
    optional `train_labels` [N] (class indices) and `train_ids` [N] (default 0..N-1). targets: images
    [T, C, H, W] in [-1, 1], PNG paths, or a folder of PNGs; `target_labels` their condition vectors [T, d]
    (one-hot classes; None: unconditional). overrides: the method's config keys (e.g. num_noises=16).
    work_dir: a folder for the per-target parts (a rerun resumes there); default a temporary one.
    Returns Scores ([T, N] matrix, the training ids, .top(k))."""
    from mucs.attrib.base import Context, attribute as run_method, get_method, merge, load_attrib
    from mucs.model import save_weights

    if not isinstance(denoiser, Denoiser):
        raise UserError("denoiser must be a mucs.Denoiser (mucs.load(run folder or diffusers folder))")
    cfg = method_config(denoiser.cfg, method, overrides)
    dev = _device(device)
    split = _train_split(train, train_labels, train_ids, denoiser.meta)
    x = _targets(targets, denoiser.meta)
    if target_labels is not None:
        target_labels = torch.as_tensor(target_labels).float()
        if target_labels.ndim != 2 or len(target_labels) != len(x):
            raise UserError(f"target_labels has shape {tuple(target_labels.shape)}; give [targets, label dim] "
                            f"({len(x)} rows)")
    tmp = None
    if work_dir is None:
        work_dir = tmp = Path(tempfile.mkdtemp(prefix="mucs-attrib-"))
    work_dir = Path(work_dir)
    shared = denoiser.folder
    if shared is None or not isinstance(train, (str, Path)):  # caches keyed by a weights file: write one
        shared = work_dir / "model"
        save_weights(shared / ("model-last.safetensors" if cfg.use_last_ckpt else "model-best.safetensors"), denoiser.D)
    try:
        ctx = Context(cfg, denoiser.D.to(dev), split, denoiser.meta, dev, Path(shared), work_dir)
        run_method(get_method(method)(cfg.attrib, ctx), x, target_labels, work_dir)
        k = num_removal or C.num_removal(cfg)
        merge(work_dir, len(x), split.ids, min(int(k), len(split)))
        s = load_attrib(work_dir)
        return Scores(s["scores"], s["train_ids"], method)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _paths(overrides=()):
    return C.compose(list(overrides)).paths


def run(job: str, what: str = "tpre,gpre,a,tpost,gpost", *, seed: int = 1, method: str = "random",
        overrides: Sequence[str] = (), device: str = "auto") -> Path:
    """pipeline.py as a function: the stages `what` of preset `job` for one seed and method, through the same stage
    code (finished stages are skipped, a killed one resumes). overrides: Hydra overrides as on the command line
    (e.g. "train.steps=500"). Returns the run's pre folder (`<paths.logs>/<run>--pre`)."""
    from mucs import runner as R
    from mucs import stages as S

    names = R.parse_what(what)
    cfg = C.compose([f"job={job}", f"seed={int(seed)}", f"attrib={method}", f"device={device}", *overrides])
    j = S.Job(cfg)
    S.check_model(j)
    for stage in names:
        R.run_stage(j, stage, will_run=names)
    return j.pre


def counterfactual(job: str, method: str, seeds: Sequence[int] = (1,), *, overrides: Sequence[str] = (),
                   metrics: str | None = None, device: str = "auto"):
    """The counterfactual test of `method` on preset `job`: for every seed the five stages (tpre, gpre, a, tpost,
    gpost) for random removal and for the method (`run`), then `evaluate` over the seeds pooled. Returns the
    evaluation table (a pandas DataFrame, one row per method and metric)."""
    runs = [run(job, seed=s, method=m, overrides=overrides, device=device).name.removesuffix("--pre")
            for s in seeds for m in ("random", method)]
    return evaluate(sorted(set(runs)), ["random", method], metrics=metrics, overrides=overrides, device=device)


def evaluate(runs: Sequence[str], methods: Sequence[str], *, metrics: str | None = None, logs=None, out=None,
             plots: bool = True, overrides: Sequence[str] = (), device: str = "auto"):
    """eval.py as a function: the counterfactual evaluation of `methods` (random is added when missing) over the
    run names `runs` (globs allowed) in `logs` (default paths.logs). Writes sims/summary/per_seed/overlap CSVs
    and plots into `out` (default `<paths.plots>/eval_<first run>`) and returns the pooled summary DataFrame
    (auc_target, ratio_target, p_target, and the same for controls; `.attrs["out"]` is the folder)."""
    from mucs.evaluation import evaluate as run_evaluation, find_jobs

    p = _paths(overrides)
    logs = Path(logs or p.logs)
    if isinstance(runs, str):
        runs = [runs]
    jobs = find_jobs(",".join(runs), logs)
    methods = ["random"] + [m for m in methods if m != "random"]
    out = Path(out) if out else Path(p.plots) / (f"eval_{jobs[0]}" + (f"_x{len(jobs)}" if len(jobs) > 1 else ""))
    res = run_evaluation(jobs, methods, logs, out, metrics, p.cache, plots=plots, show_controls=True, device=device)
    summary = res["summary"]
    summary.attrs["out"] = str(res["out"])
    return summary


def report(eval_folder, *, logs=None, top: int = 10, overrides: Sequence[str] = ()) -> Path:
    """report.py as a function: the self-contained HTML report of an evaluation folder (the `out` of `evaluate`).
    Returns the path of report.html."""
    from mucs.reporting import write_report

    folder = Path(eval_folder)
    if not folder.is_dir():
        raise UserError(f"no evaluation folder {folder}; run mucs.evaluate (or eval.py) first")
    return write_report(folder, logs or _paths(overrides).logs, top)
