"""Compose the Hydra config of a job, name its run folders, and save/read the resolved config."""
import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf, DictConfig

from mucs.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO))


def options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose(overrides=()) -> DictConfig:
    """The resolved config for a list of Hydra overrides (`job=...`, `attrib=...`, `key=value`)."""
    from hydra import compose as h_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    for o in overrides:
        if "=" not in o:
            raise UserError(f"malformed override {o!r}: overrides are key=value (e.g. train.steps=500)")
    for group in ("job", "attrib", "launcher"):
        for o in overrides:
            k, v = o.split("=", 1)
            if k.lstrip("+~") == group and v not in options(group):
                raise UserError(f"unknown {group} {v!r}; choose from {', '.join(options(group))}")
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = h_compose("config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        msg = " ".join(str(e).split())
        raise UserError(f"bad config override: {msg[:300]}")
    return cfg


def num_removal(cfg):
    if cfg.num_removal is not None:
        return int(cfg.num_removal)
    return int(round(cfg.data.num_removal_base * cfg.topk_factor))


def num_gen(cfg):
    return int(round(cfg.num_attrib * (1 + cfg.control_factor)))


def run_name(cfg):
    """`<job>_s<seed>_k<topk>_na<num_attrib>_sb<subsample>`, as in the published code."""
    return f"{cfg.job_name}_s{cfg.seed}_k{cfg.topk_factor}_na{cfg.num_attrib}_sb{cfg.subsample}"


def pre_dir(cfg):
    return Path(cfg.paths.logs) / f"{run_name(cfg)}--pre"


def post_dir(cfg, method=None):
    return Path(cfg.paths.logs) / f"{run_name(cfg)}--post_{method or cfg.attrib.name}"


def to_yaml(cfg):
    return OmegaConf.to_yaml(cfg, resolve=True)


def section_hash(cfg, *keys):
    """A short hash of the named config sections: what a stage's output depends on."""
    blob = json.dumps({k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
                       for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_saved(path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing saved config {path}; run the stage that creates this run folder first")
    try:
        return OmegaConf.load(path)
    except Exception as e:
        raise UserError(f"corrupted saved config {path} ({e.__class__.__name__}); delete the run folder and rerun")
