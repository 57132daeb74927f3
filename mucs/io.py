"""Atomic file writes and safe loads. Every stage output goes through here."""
import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mucs.errors import UserError

META = "mucs"  # the one metadata entry of our safetensors files


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp (and writers that recreate the file) make 0600
        os.replace(tmp, path)
    except BaseException as e:
        full = disk_full(e, path.parent)  # asked before the partial file is removed
        _unlink(tmp)
        if full:
            raise UserError(f"disk full while writing {path}; free space and rerun (nothing was overwritten)") from e
        raise


def _unlink(p):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)


def disk_full(e, folder):
    """Whether a failed write ran out of space: ENOSPC itself, or a library error (safetensors, torch.save)
    that wraps it in another type or loses the errno, on a filesystem with no space left."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
        return True
    if not isinstance(e, Exception) or isinstance(e, UserError):
        return False
    try:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        return False


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"missing file {path}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupted JSON file {path} ({e.__class__.__name__}); delete it and rerun the stage that writes it")


def save_tensors(path, tensors: dict, metadata: dict | None = None):
    """Save a flat dict of tensors as safetensors (no code can run when it is loaded). The metadata goes in
    one sorted JSON entry: safetensors writes several entries in a random order, and equal runs must give
    equal bytes."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {META: json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path, what="file", hint="rerun the stage that writes it"):
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing {what} {path}; {hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"corrupted or truncated {what} {path} ({str(e).splitlines()[0][:80]}); delete it and {hint}")


def load_tensor_metadata(path, what="file", hint="rerun the stage that writes it"):
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        return json.loads(raw[META]) if META in raw else {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupted or truncated {what} {path} ({str(e).splitlines()[0][:80]}); delete it and {hint}")


def torch_save(path, obj):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def torch_load(path, what="checkpoint", hint="rerun the stage that writes it"):
    """Load a torch file with weights_only=True: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing {what} {path}; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, bad magic ...
        raise UserError(f"corrupted, truncated or unsafe {what} {path} ({e.__class__.__name__}); delete it and {hint}")


def digest(*parts):
    """A short hash of tensors (dtype, shape and bytes) and plain data (its JSON): keys of caches."""
    h = hashlib.sha256()
    for p in parts:
        if torch.is_tensor(p):
            p = p.detach().cpu().contiguous()
            h.update(f"{p.dtype}{tuple(p.shape)}".encode() + p.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def file_hash(path, n=16):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]
