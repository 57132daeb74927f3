"""One writer per run folder: a lock file that a second pipeline waits on or stops at, naming its holder.

The lock is `<folder>/.lock`, created with O_EXCL and holding the owner's pid, host, process start time,
Slurm job and the time it was taken. A lock whose owner is gone is stale and is taken over with a notice:
on this host when the pid no longer runs (or now belongs to a younger process), on another host only when
it is our own Slurm job (requeued after a kill). A lock of a live or unknowable owner is never broken: the
message says whom it belongs to and how to wait. Checking-and-taking-over runs under a short fcntl lock of
the folder itself, so two processes never both take over one stale lock.
"""
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from mucs.errors import UserError

LOCK = ".lock"
UNREADABLE_AFTER = 30.0  # s: an empty/garbled lock file this old is a crash between create and write


def _proc_stat(pid):
    """(state, start time in clock ticks) of a process on this host, None if there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")  # a zombie has finished


def me():
    pid = os.getpid()
    stat = _proc_stat(pid)
    return dict(pid=pid, host=socket.gethostname(), start=stat and stat[1], slurm=os.environ.get("SLURM_JOB_ID"),
                since=time.strftime("%Y-%m-%d %H:%M:%S"), cmd=" ".join(sys.argv)[:300], token=uuid.uuid4().hex)


def why_stale(holder, age):
    """Why the holder of a lock is certainly gone; '' if it may be alive."""
    if holder is None:
        return f"unreadable lock file, {age:.0f} s old" if age > UNREADABLE_AFTER else ""
    host, pid, mine = holder.get("host"), holder.get("pid"), me()
    if host != mine["host"]:
        if holder.get("slurm") and holder["slurm"] == mine["slurm"]:
            return f"Slurm job {mine['slurm']} was requeued"
        return ""
    if not isinstance(pid, int) or not _alive(pid):
        return f"process {pid} is gone"
    stat = _proc_stat(pid)
    if holder.get("start") and stat and stat[1] != holder["start"]:
        return f"pid {pid} now belongs to another process"
    return ""


@contextlib.contextmanager
def _guard(folder):
    """A short exclusive fcntl lock of the folder; a no-op where the filesystem does not support it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # also releases the flock


class FolderLock:
    """`with FolderLock(folder, wait=s, what="tpre"):` hold the folder's lock; wait up to `wait` seconds
    (0: stop at once) for another holder, then raise a UserError naming it."""

    def __init__(self, folder, wait=0.0, what="", name=LOCK):
        self.folder, self.wait, self.what = Path(folder), float(wait or 0), what
        self.path = self.folder / name
        self.mine = None

    def read(self):
        """(holder dict or None if unreadable, age in s); (None, None) if there is no lock file."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
            return (holder if isinstance(holder, dict) else None), age
        except json.JSONDecodeError:
            return None, age

    def _create(self):
        """Create the lock file with our identity; False if it exists already."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        mine = dict(me(), what=self.what)
        try:
            os.write(fd, json.dumps(mine).encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            if e.errno == 28:
                raise UserError(f"disk full while writing the lock {self.path}; free space and rerun") from e
            raise
        os.close(fd)
        self.mine = mine
        return True

    def _take_over_if_stale(self):
        """Replace a stale lock by ours, in one step under the guard; True if we hold the lock now."""
        with _guard(self.folder):
            holder, age = self.read()
            if age is None:
                return self._create()  # released meanwhile
            why = why_stale(holder, age)
            if not why:
                return False
            h = holder or {}
            print(f"[lock] taking over the stale lock of {self.folder} (pid {h.get('pid', '?')} on "
                  f"{h.get('host', '?')}, {h.get('what') or 'a stage'} since {h.get('since', '?')}): {why}")
            self.path.unlink(missing_ok=True)
            return self._create()

    def describe(self, holder):
        if holder is None:
            return f"an unreadable lock {self.path}"
        return (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('what') or 'a stage'}, "
                f"since {holder.get('since')})")

    def acquire(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline, told = time.monotonic() + self.wait, False
        while True:
            if self._create() or self._take_over_if_stale():
                return self
            holder, _ = self.read()
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f"after waiting {self.wait:g} s " if self.wait > 0 else ""
                raise UserError(f"run folder {self.folder} is in use {waited}by {self.describe(holder)}; let it finish "
                                f"or pass lock_wait=SECONDS to wait for it; if that process is gone for good, "
                                f"delete {self.path}")
            if not told:
                print(f"[lock] {self.folder} is in use by {self.describe(holder)}; waiting up to {self.wait:g} s")
                told = True
            time.sleep(min(0.5, left))

    def release(self):
        if self.mine is None:
            return
        with _guard(self.folder):
            holder, _ = self.read()
            if holder and holder.get("token") == self.mine["token"]:
                self.path.unlink(missing_ok=True)
        self.mine = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def folder_lock(folder, wait=0.0, what=""):
    """The lock of a run folder for this process. Ranks > 0 of a distributed launch share rank 0's lock."""
    if int(os.environ.get("RANK", "0") or 0) > 0:
        return contextlib.nullcontext()
    return FolderLock(folder, wait, what)
