"""Safe outputs: check an output folder before any work, claim a set of output names for one run,
write them to temporary files and move them into place together.

- :func:`check_output_folder`: the folder (or the nearest existing folder above it) must be a
  folder, not a file, and writable (tried by creating and removing a probe, which also catches
  immutable folders and read-only mounts, where ``os.access`` says yes to root).
- :class:`OutputSet`: a lock per output set (``.<name>.mias-sam.lock`` beside the outputs, held with
  ``flock``, so a killed run's lock is free again) and, without ``overwrite``, exclusive creation of
  the final names (a hard link fails if the name exists). Two runs into the same names can never
  both succeed. The lock file doubles as a commit journal: a run killed while moving its files into
  place is completed by the next run that takes the same lock (every temporary file was complete).
- Temporary names carry their owner (``.<name>.mias-<host>-<pid>-<rand>.part<suffix>``); the next
  save into a folder removes those whose process is gone, or that are older than a day when the
  owner cannot be checked (another host, or an unnamed leftover of an older version).
- Files and folders are created with the user's umask, as ``open()`` and ``mkdir`` would.

Size: one module on purpose (about 470 lines): the folder check, the lock, the exclusive names, the
journal and the sweep are one protocol whose steps must agree on the same names and order.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError
from .termination import critical

try:  # POSIX; on Windows the lock falls back to exclusive creation of the lock file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "OutputBusyError",
    "OutputSet",
    "check_output_folder",
    "atomic_path",
    "atomic_write_text",
    "new_temp_file",
    "new_temp_dir",
    "sweep_stale",
    "STALE_AFTER_S",
]

HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
#: A temporary entry whose owner cannot be checked is removed when it is older than this.
STALE_AFTER_S = 24 * 3600
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.mias-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-(?P<rand>[0-9a-z]{8})\.(?P<kind>part|old)(?P<suffix>.*)$")
_LEGACY_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.part(\..*)?$")  # tempfile's names (versions before this one)
LOCK_SUFFIX = ".mias-sam.lock"
_NO_LOCKS = {e for e in (getattr(errno, n, None) for n in ("ENOLCK", "ENOTSUP", "EOPNOTSUPP", "EINVAL")) if e is not None}


class OutputBusyError(InputError):
    """Another run holds the lock on the same output names."""


# -- checking a folder ----------------------------------------------------------------------
def check_output_folder(folder: str | os.PathLike, *, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be
    written (read-only, immutable, no permission). Returns the folder (not created here)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: {what} is an existing file, not a folder; choose a folder for the outputs.")
    probe_in = folder
    while not probe_in.exists():
        parent = probe_in.parent
        if parent == probe_in:
            break
        probe_in = parent
    if not probe_in.is_dir():
        raise InputError(f"{folder}: {what} lies under {probe_in}, which is a file, not a folder; choose another output folder.")
    try:  # really try: os.access says yes to root in an immutable folder or on a read-only mount
        probe = probe_in / f".mias-sam-probe-{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(probe, 0o700)
        os.rmdir(probe)
    except OSError as exc:
        where = f"{folder}" if probe_in == folder else f"{folder} (in {probe_in})"
        raise InputError(f"{where}: cannot write there ({exc.strerror or exc}); choose a writable {what} folder.") from exc
    return folder


# -- temporary names ------------------------------------------------------------------------
def _suffix(name: str) -> str:
    low = name.lower()
    for s in (".nii.gz",):
        if low.endswith(s):
            return name[-len(s):]
    return Path(name).suffix


def _temp_path(target: Path, kind: str = "part") -> Path:
    rand = secrets.token_hex(4)
    return target.parent / f".{target.name}.mias-{HOST_TAG}-{os.getpid()}-{rand}.{kind}{_suffix(target.name) if kind == 'part' else ''}"


def new_temp_file(target: str | os.PathLike) -> Path:
    """Create an empty temporary file beside ``target`` (the user's umask applies) and return it.
    The real suffix is kept, so that libraries choosing a format by extension behave."""
    target = Path(target)
    while True:
        tmp = _temp_path(target)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def new_temp_dir(target: str | os.PathLike) -> Path:
    """Create an empty temporary folder beside ``target`` (the user's umask applies)."""
    target = Path(target)
    while True:
        tmp = _temp_path(target)
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:  # pragma: no cover
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would send CTRL_C_EVENT; rely on age
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep
    return True


def sweep_stale(folder: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove temporary leftovers of dead runs in ``folder``; return what was removed.

    An entry named by this module is removed when its process (same host) is gone, or when it is
    older than :data:`STALE_AFTER_S` and its owner cannot be checked; an unnamed ``.part`` of an
    older version only by age. A dead run's ``.old`` copy of a bank whose replacement never
    arrived is put back in place instead of being removed."""
    folder = Path(folder)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = [e for e in folder.iterdir() if e.name.startswith(".")]
    except OSError:
        return removed
    for e in entries:  # first the locks of dead runs: finish their commits, then remove them
        if e.name.endswith(LOCK_SUFFIX) and fcntl is not None:
            lock = _Lock(e)
            try:
                journal = lock.acquire()
            except (OutputBusyError, OSError):
                continue  # held by a live run (or this one)
            if lock.unlocked:  # no locks on this filesystem: cannot tell a dead run's lock from a live one's
                os.close(lock.fd)
                continue
            try:
                if journal:
                    _roll_forward(journal)
            finally:
                lock.release()
            removed.append(e)
    for e in entries:
        if e.name.endswith(LOCK_SUFFIX):
            continue
        m = _TEMP_RE.match(e.name)
        try:
            age = now - e.lstat().st_mtime
        except FileNotFoundError:
            continue
        if m is not None:
            same_host = m["host"] == HOST_TAG
            dead = same_host and not _pid_alive(int(m["pid"]))
            if not (dead or (not same_host and age > STALE_AFTER_S)):
                continue
            if m["kind"] == "old":
                target = folder / m["target"]
                if not target.exists():
                    with contextlib.suppress(OSError):
                        os.replace(e, target)  # the replacement never arrived: the old one goes back
                        continue
            _remove(e)
            removed.append(e)
        elif _LEGACY_RE.match(e.name) and age > STALE_AFTER_S:
            _remove(e)
            removed.append(e)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.
    On error (or SIGINT/SIGTERM) the temporary file is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    tmp = new_temp_file(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


# -- locks ------------------------------------------------------------------------------------
class _Lock:
    """An exclusive lock on ``path`` held through an open file (``flock``): released by the kernel
    when the process dies. The file is removed on release; its text is the commit journal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.unlocked = False  # the filesystem has no locks: held in name only

    def acquire(self) -> dict | None:
        """Take the lock or raise :class:`OutputBusyError`; return a dead holder's journal."""
        while True:
            fd = self._create_windows() if fcntl is None else os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in _NO_LOCKS:  # a share without locks: exclusive final names still hold
                        self.fd, self.unlocked = fd, True
                        return None
                    holder = _read(fd)
                    os.close(fd)
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise OutputBusyError(_busy_message(self.path, holder)) from None
                    raise
                try:  # the file we locked must still be the one at the path (a releaser unlinks it)
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            self.fd = fd
            journal = _read(fd)
            self.write({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            return journal if journal and journal.get("commit") else None

    def _create_windows(self) -> int:  # pragma: no cover - Windows
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            with contextlib.suppress(OSError, ValueError):
                holder = json.loads(self.path.read_text() or "{}")
                if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
                    self.path.unlink()
                    return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            raise OutputBusyError(_busy_message(self.path, None)) from None

    def write(self, obj: dict) -> None:
        assert self.fd is not None
        data = json.dumps(obj).encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)
        with contextlib.suppress(OSError):
            os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding it: a waiter sees another inode and retries
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 20)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def _busy_message(path: Path, holder: dict | None) -> str:
    who = ""
    if holder and holder.get("pid"):
        who = f" (process {holder['pid']} on {holder.get('host', '?')}, since {time.strftime('%H:%M:%S', time.localtime(holder.get('since', 0)))})"
    names = path.name[1 : -len(LOCK_SUFFIX)]
    return (f"{path.parent}: another mias-sam run is writing the outputs '{names}' there{who}; wait for it to "
            "finish, or choose another output folder.")


def _roll_forward(journal: dict) -> None:
    """Finish a dead run's commit: every temporary output in it was complete."""
    for item in journal.get("commit", []):
        tmp, final = Path(item["tmp"]), Path(item["final"])
        old = Path(item["old"]) if item.get("old") else None
        if tmp.exists():
            if old is not None and final.exists() and not old.exists():
                os.replace(final, old)
            if not tmp.is_dir() and final.exists() and os.path.samefile(tmp, final):
                tmp.unlink()
            else:
                os.replace(tmp, final)
        if old is not None and old.exists() and final.exists():
            _remove(old)


# -- output sets ------------------------------------------------------------------------------
class OutputSet:
    """The outputs of one run in one folder, claimed before the work and moved into place together.

    ``with OutputSet(folder, names, overwrite=...) as outs:`` checks the folder, takes the lock
    (refusing if another run holds it), refuses existing names unless ``overwrite`` and names that
    are ``inputs``; ``outs.temp(name)`` / ``outs.temp_dir(name)`` give temporary paths to write;
    ``outs.commit()`` moves them all into place (signals deferred meanwhile). Leaving the block
    removes what was not committed and a folder that the claim created and left empty."""

    def __init__(self, folder: str | os.PathLike, names: Iterable[str], *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), lock_name: str | None = None, what: str = "--out") -> None:
        self.folder = Path(folder)
        self.names = list(names)
        self.overwrite = overwrite
        self.inputs = {Path(p).resolve() for p in inputs if p is not None}
        self.what = what
        self.lock = _Lock(self.folder / f".{lock_name or self.names[0]}{LOCK_SUFFIX}")
        self._temps: dict[str, Path] = {}
        self._created: list[Path] = []
        self.committed = False
        self.claimed = False

    @property
    def paths(self) -> dict[str, Path]:
        return {n: self.folder / n for n in self.names}

    def check(self) -> None:
        """The checks of :meth:`claim` that need no lock (for validating a batch up front); leftovers
        of dead runs in the folder are cleaned up first."""
        check_output_folder(self.folder, what=self.what)
        if self.folder.is_dir():
            sweep_stale(self.folder)
        for p in self.paths.values():
            if p.resolve() in self.inputs:
                raise InputError(f"{p}: output would overwrite an input file; choose another {self.what} folder.")
            if (p.exists() or p.is_symlink()) and not self.overwrite:
                raise InputError(f"{p}: already exists; choose another {self.what} folder or pass --overwrite.")

    def claim(self) -> "OutputSet":
        self.check()
        missing = []
        p = self.folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created = list(reversed(missing))
        try:
            journal = self.lock.acquire()
            if journal:
                _roll_forward(journal)
            sweep_stale(self.folder)
            self.check()  # again, under the lock: a rival may have finished meanwhile
        except BaseException:
            self.release()
            raise
        self.claimed = True
        return self

    def temp(self, name: str) -> Path:
        """A new temporary file for output ``name``."""
        self._temps[name] = t = new_temp_file(self.folder / name)
        return t

    def temp_dir(self, name: str) -> Path:
        """A new temporary folder for output ``name`` (a bank)."""
        self._temps[name] = t = new_temp_dir(self.folder / name)
        return t

    def commit(self) -> dict[str, Path]:
        """Move every temporary output into place; without ``overwrite`` no existing name is replaced."""
        assert self.claimed, "claim() first"
        items = []
        for name, tmp in self._temps.items():
            final = self.folder / name
            old = _temp_path(final, "old") if (self.overwrite and tmp.is_dir() and final.exists()) else None
            items.append({"tmp": str(tmp), "final": str(final), "old": None if old is None else str(old)})
        with critical():
            self.lock.write({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "commit": items})
            done: list[Path] = []
            try:
                for it in items:
                    tmp, final = Path(it["tmp"]), Path(it["final"])
                    if it["old"]:
                        os.replace(final, it["old"])
                        os.replace(tmp, final)
                        _remove(Path(it["old"]))
                    elif self.overwrite:
                        os.replace(tmp, final)
                    else:
                        _place_exclusive(tmp, final)
                        done.append(final)
            except FileExistsError as exc:
                for f in done:  # undo this run's part: never half a set
                    f.unlink(missing_ok=True)
                raise InputError(f"{exc.filename}: appeared while this run was writing; nothing of this run was kept. "
                                 "Choose another output folder or pass --overwrite.") from None
            self.lock.write({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        self._temps.clear()
        self.committed = True
        return {n: self.folder / n for n in self.names}

    def release(self) -> None:
        for tmp in self._temps.values():
            _remove(tmp)
        self._temps.clear()
        self.lock.release()
        if not self.committed:
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
        self.claimed = False

    def __enter__(self) -> "OutputSet":
        return self.claim() if not self.claimed else self

    def __exit__(self, *exc) -> None:
        self.release()


def _place_exclusive(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` unless ``final`` exists (FileExistsError): a hard link is atomic and
    exclusive; where the filesystem has none (FAT, some network shares) a check then a rename."""
    if tmp.is_dir():
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final))
        os.rename(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        os.replace(tmp, final)
        return
    tmp.unlink()
