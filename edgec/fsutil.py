"""Everything edgec writes goes through here: atomic files, edgec's own temp area, a staging dir next to an
output, the lock that keeps two builds off one output, and the interrupt handling that must not cut a publish
in half.

What may be removed: directories edgec created under its cache dir (`tmp/run-*`) and next to an output
(`.NAME.edgec-staging-*`), and only while no live process holds their lock. The lock is an flock on the
directory itself, so it dies with its process: the debris of a killed run (even SIGKILL) is recognisable, and
the next run removes it. Nothing else of the user's is ever touched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import EdgecError, Interrupted

STAGING_MARK = ".edgec-staging-"
_RUN_PREFIX = "run-"


def atomic_write(path: str | Path, data: bytes | str, mode: int = 0o666) -> Path:
    """Write a file that readers see whole or not at all: temp sibling, fsync, rename.
    `mode` is filtered by the umask, as for any new file."""
    path = Path(path)
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    return path


# ---------------------------------------------------------------------------------------- locked temp dirs

def _same_dir(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextlib.contextmanager
def _locked_dir(parent: Path, prefix: str):
    """A new directory parent/PREFIXxxxxxxxx, flock'ed for as long as the block runs, then removed."""
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:      # a sweep removed it before we could open it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:        # a sweep holds it and is about to remove it
            os.close(fd)
            continue
        except OSError:                # no flock on this filesystem (some NFS): sweeps will never remove it
            pass
        if _same_dir(fd, path):
            break
        os.close(fd)                   # a sweep removed it between mkdtemp and our lock
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _sweep(parent: Path, pattern: re.Pattern) -> None:
    """Remove the directories in `parent` named by `pattern` whose lock no live process holds."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = parent / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:                # held by a live run, or flock cannot tell: keep it
            os.close(fd)
            continue
        try:
            if _same_dir(fd, path):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _cache_dir() -> Path:
    from .toolchain import cache_dir

    return cache_dir()


@contextlib.contextmanager
def workspace():
    """A private temp dir under edgec's cache ($EDGEC_CACHE_DIR/tmp), removed at the end.

    Meanwhile it is also the process's temp dir (tempfile.tempdir and $TMPDIR), so TVM's own temp dirs
    (export_library) and the compilers' temp files land in it and never outlive the run. Stale workspaces
    of killed runs are removed first.
    """
    root = _cache_dir() / "tmp"
    with contextlib.ExitStack() as stack:
        with writing_to(root):       # only the setup: errors of the work inside are about other paths
            root.mkdir(parents=True, exist_ok=True)
            _sweep(root, re.compile(re.escape(_RUN_PREFIX) + r"[A-Za-z0-9_]{8}"))
            path = stack.enter_context(_locked_dir(root, _RUN_PREFIX))
        saved = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir = os.environ["TMPDIR"] = str(path)
        try:
            yield path
        finally:
            tempfile.tempdir = saved[0]
            if saved[1] is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved[1]


def _staging_pattern(dest: Path) -> re.Pattern:
    return re.compile(re.escape(f".{dest.name}{STAGING_MARK}") + r"[A-Za-z0-9_]{8}")


@contextlib.contextmanager
def staging_dir(dest: Path):
    """A locked scratch dir next to `dest`, on the same filesystem so that publishing is a rename:
    .NAME.edgec-staging-XXXXXXXX. Stale ones of the same dest (a killed run's) are removed first."""
    dest = Path(dest)
    _sweep(dest.parent, _staging_pattern(dest))
    with _locked_dir(dest.parent, f".{dest.name}{STAGING_MARK}") as path:
        yield path


@contextlib.contextmanager
def new_dir(final: Path):
    """Build a directory that appears at `final` whole or not at all (a cache entry): the block fills a staging
    sibling, which is then renamed to `final`, unless another process got there first (theirs is kept)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(final) as tmp:
        yield tmp
        tmp.chmod(0o755)           # mkdtemp made it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise


@contextlib.contextmanager
def output_lock(dest: Path):
    """Claim an output path for a whole build, so that a second build to it fails at once instead of both
    reporting success. Keyed by the resolved path, in the cache dir (never next to the user's files)."""
    dest = Path(dest).resolve()
    locks = _cache_dir() / "locks"
    with writing_to(locks):
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{hashlib.sha256(str(dest).encode()).hexdigest()[:32]}.lock", os.O_RDWR | os.O_CREAT,
                     0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgecError(f"another edgec build is writing {dest}",
                             "wait for it to finish, or pick another -o") from None
        except OSError:                # no flock on this filesystem: builds are not serialized
            pass
        yield dest
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------- publishing

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the kernel, libc or the
    filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(src: Path, dest: Path) -> None:
    """Put directory src at dest; whatever dest held moves to src's path, for the caller to remove (or to put
    back with swap_in(dest, src)). Atomic where the filesystem can exchange two paths."""
    if not os.path.lexists(dest):
        os.rename(src, dest)
        return
    if _exchange(src, dest):
        return
    # No exchange here: dest is missing for a moment. Inside the staging dir, the set-aside copy is swept
    # with it if the process dies right now.
    aside = src.with_name(src.name + ".old")
    os.rename(dest, aside)
    os.rename(src, dest)
    os.rename(aside, src)


# ---------------------------------------------------------------------------------------- the user's files

def check_overwrite(path: Path, force: bool, option: str) -> None:
    """Refuse to replace an existing file unless --force said so; a directory is never replaced."""
    if path.is_dir():
        raise EdgecError(f"{option} {path} is a directory", f"pass a file path to {option}")
    if os.path.lexists(path) and not force:
        raise EdgecError(f"{path} exists", f"pass --force to overwrite it, or another path to {option}")


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
    return 1 << 62


def _no_space(error: BaseException) -> bool:
    # Compilers and TVM report a full disk only in their text; OSErrors carry the errno.
    while error is not None:
        if getattr(error, "errno", None) in _NO_SPACE or os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def as_user_error(error: BaseException, where: Path, *also: Path) -> EdgecError | None:
    """The user error for a write under `where` (or `also`) that failed because of the user's disk: full, or
    not writable. None when the error is something else."""
    if _no_space(error):
        place = min((Path(where), *map(Path, also)), key=_free_bytes)
        return EdgecError(f"no space left on the disk holding {place} (the filesystem is full)",
                          "free some space there, or write elsewhere (-o, $EDGEC_CACHE_DIR)")
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE:
        return EdgecError(f"cannot write in {where} ({error.strerror})", "pick a directory you can write to")
    return None


@contextlib.contextmanager
def writing_to(where: Path):
    """Name a full disk or an unwritable directory under `where` as the user's problem, not edgec's."""
    try:
        yield
    except Exception as e:
        user = as_user_error(e, Path(where))
        if user is None:
            raise
        raise user from e


# ---------------------------------------------------------------------------------------- interrupts

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: int | None = None     # the first signal since signals_as_interrupts() began
_holding = 0                     # depth of uninterrupted() blocks
_held_back = False               # a signal arrived inside one of them


def _forward_to_children(signum: int) -> None:
    # A compiler started by TVM would otherwise keep running (and writing) after edgec is gone. Ctrl-C reaches
    # the whole process group anyway; SIGTERM from a supervisor reaches only us.
    for children in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            for pid in children.read_text().split():
                os.kill(int(pid), signum)


def _on_signal(signum, frame):
    global _received, _held_back
    if _received is not None:      # cleanup after the first one is under way: do not cut it short
        return
    _received = signum
    _forward_to_children(signum)
    if _holding:
        _held_back = True
    else:
        raise Interrupted(signum)


def received_signal() -> int | None:
    """The signal that interrupted this run, if any: TVM may rewrap the Interrupted raised inside its calls."""
    return _received


@contextlib.contextmanager
def signals_as_interrupts():
    """While active, SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread (as Ctrl-C raises
    KeyboardInterrupt), so every `finally` and context manager cleans up on the way out."""
    global _received, _held_back
    if threading.current_thread() is not threading.main_thread():   # only the main thread may set handlers
        yield
        return
    _received, _held_back = None, False
    previous = {s: signal.signal(s, _on_signal) for s in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received, _held_back = None, False


@contextlib.contextmanager
def uninterrupted():
    """Hold interrupts off while the filesystem is between two consistent states; one that arrived meanwhile
    is raised at the end."""
    global _holding, _held_back
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if not _holding and _held_back:
            _held_back = False
            raise Interrupted(_received)
