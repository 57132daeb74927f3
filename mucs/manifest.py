"""Manifests: what a stage's outputs were computed from. A stage refuses an input whose stage has not finished,
that changed since it was written, or that was made from settings or inputs that changed since; an unfinished
stage refuses to resume progress made with other settings or inputs.

  <folder>/<stage>.manifest.json   settings it depends on and their hash, input hashes, output hashes, code
                                   version, seconds: written when the stage finishes
  <folder>/<stage>.progress.json   settings and input hashes of an unfinished attempt
"""
import json
import os
import subprocess
import time
from pathlib import Path

from mucs import config as C
from mucs.errors import UserError
from mucs.io import file_hash, read_json, write_json
from mucs.stages import ORDER, STAGES

FOLDER_SETTINGS = ("data", "model", "train", "seed", "subsample")  # a run folder's settings that results depend on
_HASHES = {}


def code_version():
    try:
        out = subprocess.run(["git", "-C", str(C.REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def manifest_path(job, stage):
    return stage.folder(job) / f"{stage.name}.manifest.json"


def progress_path(job, stage):
    """What an unfinished attempt of a stage computes from (removed when its manifest is written)."""
    return stage.folder(job) / f"{stage.name}.progress.json"


def hash_of(path):
    """file_hash, remembered per (file, size, mtime) within this process."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_hash(path)
    return _HASHES[key]


def settings_of(cfg, keys):
    """Config sections as plain data; the dataset's location is not a setting (its files are hashed as inputs),
    nor what its config expects the data to be (data.expect)."""
    s = C.sections(cfg, *keys)
    if isinstance(s.get("data"), dict):
        s["data"] = {k: v for k, v in s["data"].items() if k not in ("folder", "expect")}
    if isinstance(s.get("attrib"), dict):  # how fast, not what: batch layout and compilation change only float noise
        s["attrib"] = {k: v for k, v in s["attrib"].items() if k not in ("eval_batch", "compile", "channels_last")}
    return C.drop_later_defaults(s, cfg.model.net)


def redo(name):
    return f"--what={','.join(ORDER[ORDER.index(name):] if name in ORDER else [name])} --force"


def extended(stage, old, new):
    """Settings `old` differ from `new` in the stage's extent keys alone (Stage.extent)."""
    def without(s):
        for key in stage.extent:
            *parents, last = key.split(".")
            d = s
            for p in parents:
                d = d.get(p, {})
            d.pop(last, None)
        return s
    if not stage.extent or not isinstance(old, dict):
        return False
    old, new = (json.loads(json.dumps(s, sort_keys=True, default=str)) for s in (old, new))  # copies, as manifests hold them
    return old != new and without(old) == without(new)


def check_settings(job, stage, recorded, what, fix):
    """Refuse `what` (outputs or progress of `stage`) if it was made with other settings than the current ones (or
    with settings that differ only in the stage's extent: it grows)."""
    now = settings_of(job.cfg, stage.depends)
    if recorded.get("config") == C.hash_settings(now) or extended(stage, recorded.get("settings"), now):
        return
    diff = C.differences(recorded["settings"], now) if "settings" in recorded else [f"{', '.join(stage.depends)}"]
    raise UserError(f"{what} was made with other settings ({'; '.join(diff)}); pass the same settings, or {fix}")


def input_key(path):
    """How a manifest names an input: its folder and file name, so copied or moved run folders keep their meaning."""
    return f"{Path(path).parent.name}/{Path(path).name}"


def check_files(name, folder, m, outs, inputs):
    """Outputs `outs` of stage `name` in `folder` are as its manifest m records, and so are its `inputs` (their
    current paths)."""
    for o in outs:
        h = m.get("outputs", {}).get(o)
        if h and (Path(folder) / o).exists() and hash_of(Path(folder) / o) != h:
            raise UserError(f"{Path(folder) / o} changed since {name} wrote it (corrupted or replaced); "
                            f"redo it with {redo(name)}")
    for path in inputs:
        h = m.get("inputs", {}).get(input_key(path))
        if h and Path(path).exists() and hash_of(path) != h:
            raise UserError(f"{Path(folder) / outs[0]} was made from {path}, which changed since (redone or "
                            f"replaced); redo it with {redo(name)}")


def check_record(job, stage, only=None):
    """A finished stage's outputs (or just `only`) are as it wrote them, its inputs as it read them, all made
    with the current settings, and so on up the pipeline."""
    folder, m = stage.folder(job), read_json(manifest_path(job, stage))
    check_settings(job, stage, m, f"{stage.name} output in {folder}", f"redo it with {redo(stage.name)}")
    check_files(stage.name, folder, m, [Path(only).name] if only else list(stage.outputs),
                [p for p, _ in stage.inputs(job)])
    for path, producer in stage.inputs(job):
        if producer in STAGES and Path(path).exists():
            check_fresh(job, producer, path)


def check_finished(folder, name):
    """For readers outside a pipeline (eval): stage `name` finished in `folder` and nothing it wrote or read
    has changed since."""
    path = Path(folder) / f"{name}.manifest.json"
    if not path.exists():
        raise UserError(f"stage {name} has not finished in {folder} (no {path.name}); run --what={name} first")
    m = read_json(path)
    check_files(name, folder, m, list(m.get("outputs", {})) or ["outputs"],
                [Path(folder).parent / k for k in m.get("inputs", {})])  # the run folders' inputs next to it


def check_fresh(job, name, path):
    """An input `path` written by stage `name` is finished and current."""
    s = STAGES[name]
    if not manifest_path(job, s).exists():
        raise UserError(f"{path} is there but stage {name} has not finished (no {manifest_path(job, s).name}); "
                        f"run --what={name} first (it resumes)")
    check_record(job, s, only=path)


def check_saved_config(job, folder, writer, will_run):
    """The config.yaml a run folder was made with agrees with the current config on FOLDER_SETTINGS."""
    path = Path(folder) / "config.yaml"
    if not path.exists() or (job.cfg.force and writer in will_run):
        return
    diff = C.differences(settings_of(C.load_saved(path), FOLDER_SETTINGS), settings_of(job.cfg, FOLDER_SETTINGS))
    if diff:
        raise UserError(f"run folder {folder} was made with other settings ({'; '.join(diff)}); pass the settings "
                        f"saved in {path}, or redo the folder with {redo(writer)}")


def check_inputs(job, stage, will_run):
    """Every input is there (or its stage will run first) and, when its stage has finished, current."""
    for path, producer in stage.inputs(job):
        if producer in ("data", "pretrained"):  # outside the pipeline (a pretrained folder was checked at compose)
            job.meta  # builds a bundled dataset on first use, or says what is missing
        elif not Path(path).exists():
            if producer not in will_run:
                raise UserError(f"stage {stage.name} needs {path}, which is missing; run --what={producer} first")
        elif producer not in will_run or is_done(job, STAGES[producer]):
            check_fresh(job, producer, path)


def start_progress(job, stage):
    """Record what this attempt computes from; refuse to resume progress made with other settings or inputs.
    Returns the input hashes (taken now, before the stage reads them) for the manifest."""
    now = settings_of(job.cfg, stage.depends)
    rec = dict(stage=stage.name, config=C.hash_settings(now), settings=now,
               inputs={input_key(p): hash_of(p) for p, _ in stage.inputs(job) if Path(p).exists()})
    path, folder = progress_path(job, stage), stage.folder(job)
    if path.exists():
        old, fix = read_json(path), f"rerun --what={stage.name} with --force to start it over"
        check_settings(job, stage, old, f"the unfinished {stage.name} in {folder}", fix)
        for p, h in rec["inputs"].items():
            if old.get("inputs", {}).get(p, h) != h:
                raise UserError(f"the unfinished {stage.name} in {folder} was started from another {p} (it "
                                f"changed since); {fix}")
    write_json(path, rec)
    return rec["inputs"]


def is_done(job, stage):
    """Finished, and not asked to grow (settings that differ from the manifest's in the stage's extent alone)."""
    if not manifest_path(job, stage).exists() or not all((stage.folder(job) / o).exists() for o in stage.outputs):
        return False
    return not (stage.extent and extended(stage, read_json(manifest_path(job, stage)).get("settings"),
                                          settings_of(job.cfg, stage.depends)))


def write_manifest(job, stage, seconds, inputs=None):
    """The manifest: settings and their hash, input hashes (`inputs`, taken when the stage started), output
    hashes, code version and seconds."""
    now = settings_of(job.cfg, stage.depends)
    write_json(manifest_path(job, stage), dict(
        stage=stage.name, config=C.hash_settings(now), settings=now,
        inputs=inputs if inputs is not None else {input_key(p): hash_of(p) for p, _ in stage.inputs(job)},
        outputs={o: hash_of(stage.folder(job) / o) for o in stage.outputs},
        code=code_version(), seconds=round(seconds, 2), finished=time.strftime("%Y-%m-%d %H:%M:%S")))
