"""Compose the Hydra config of a job, name its run folders, and save/read the resolved config."""
import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mucs import validate
from mucs.errors import UserError
from mucs.validate import CONFIGS, options  # noqa: F401  (options: the choices of a config group)

REPO = CONFIGS.parent

if not OmegaConf.has_resolver("repo_root"):
    OmegaConf.register_new_resolver("repo_root", lambda: str(REPO))


def compose(overrides=()) -> DictConfig:
    """The resolved config for a list of Hydra overrides (`job=...`, `attrib=...`, `key=value`)."""
    from hydra import compose as h_compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
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
            groups = {d.name for d in CONFIGS.iterdir() if d.is_dir()}
            values = [o for o in overrides if o.split("=", 1)[0] not in groups and o[0] not in "+~"
                      and not o.startswith("hydra.")]
            if values:  # the config these values override, to check they keep its kinds
                base = h_compose("config", overrides=[o for o in overrides if o not in values])
                for o, parsed in zip(values, OverridesParser.create().parse_overrides(values)):
                    check_kind(o, OmegaConf.select(base, parsed.key_or_group), parsed.value())
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        msg = " ".join(str(e).split())
        raise UserError(f"bad config override: {msg[:300]}")
    if cfg.get("pretrained"):
        apply_pretrained(cfg)
    validate.check(cfg, num_removal(cfg), num_gen(cfg))
    return cfg


def apply_pretrained(cfg):
    """pretrained=<folder>: the model block comes from the diffusers folder (its network config and scheduler),
    and the folder's name joins the job name, so its run folders are its own."""
    from mucs.diffusers_adapter import pretrained_model_cfg

    folder = Path(str(cfg.pretrained)).expanduser().resolve()
    model = pretrained_model_cfg(folder, cfg.model)
    with open_dict(cfg):
        cfg.pretrained = str(folder)
        cfg.model = OmegaConf.create(model)
        cfg.job_name = f"{cfg.job_name}-{folder.name}"


def check_kind(override, old, new):
    """A value keeps the kind of the default it replaces: `train.steps=abc` or `force=maybe` is a typo."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if isinstance(old, bool) and not isinstance(new, bool):
        raise UserError(f"bad config override {override}: expected true or false")
    if number(old) and not number(new):
        raise UserError(f"bad config override {override}: expected a number (the default is {old})")


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


def run_dir(cfg, kind):
    """The run folder of a stage with a folder of its own: <run>--<kind> (lds, logo)."""
    return Path(cfg.paths.logs) / f"{run_name(cfg)}--{kind}"


def to_yaml(cfg):
    return OmegaConf.to_yaml(cfg, resolve=True)


def sections(cfg, *keys):
    """The named config sections (or dotted keys, e.g. precision.autocast) as plain nested data."""
    out = {}
    for k in keys:
        *parents, last = k.split(".")
        v, d = cfg, out
        for p in k.split("."):
            v = v[p]
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
    return out


def section_hash(cfg, *keys):
    """A short hash of the named config sections: what a stage's output depends on."""
    return hash_settings(sections(cfg, *keys))


# Settings added after run folders already existed, with the value that reproduces the earlier behaviour: left out
# of the recorded settings while they hold it, so the manifests of those folders stay valid. OTHER_NET: a
# per-network entry that does not apply to this job's network.
OTHER_NET = object()
LATER = {"sample.sampler": "heun", "sample.scheduler": None, "tpost.mode": "retrain",
         "attrib.trainable.diffusers_unet": OTHER_NET, "attrib.trainable.diffusers_dit": OTHER_NET,
         "attrib.adaptive": False, "attrib.adaptive_blocks": 8, "attrib.adaptive_alpha": 1e-3, "attrib.adaptive_keep": 2.0,
         "attrib.adaptive_prior_dof": 0, "precision.autocast": "none", "precision.tf32": True,
         "precision.score_tf32": False, "attrib.instance_weighting": "none"}


def drop_later_defaults(s, net):
    for path, default in LATER.items():
        *parents, key = path.split(".")
        chain = [s]
        for p in parents:
            chain.append(chain[-1].get(p) if isinstance(chain[-1], dict) else None)
        d = chain[-1]
        if isinstance(d, dict) and key in d and (d[key] == default or default is OTHER_NET and key != net):
            del d[key]
            if not d and len(chain) == 2:  # a section that held only such settings
                del s[parents[0]]
    return s


def sample_settings(cfg):
    """The sample section as it keys caches (LDS measurements, MUCS's L_orig): without the later defaults."""
    return drop_later_defaults(dict(sample=dict(cfg.sample)), cfg.model.net).get("sample", {})


def hash_settings(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old, new, limit=4):
    """'key: old -> new' for the first `limit` leaves that differ between two plain nested dicts."""
    def flat(d, prefix=""):
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()} if d else {prefix: d}
    a, b = flat(old or {}), flat(new or {})
    diff = [f"{k.rstrip('.')}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if a.get(k, "(unset)") != b.get(k, "(unset)")]
    return diff[:limit] + ([f"{len(diff) - limit} more"] if len(diff) > limit else [])


def load_saved(path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing saved config {path}; run the stage that creates this run folder first")
    try:
        return OmegaConf.load(path)
    except Exception as e:
        raise UserError(f"corrupted saved config {path} ({e.__class__.__name__}); delete the run folder and rerun")
