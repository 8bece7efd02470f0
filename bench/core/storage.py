"""On-disk plumbing shared by the model cache, the activation cache and results.

Everything featbench writes goes through `atomic_write`: the bytes land in a
temporary file in the destination folder and are renamed into place, so a job
killed at any moment leaves either the old file or the new one, never half a
file. `entry_lock` serialises concurrent writers of one cache entry (several
jobs of a sweep extracting the same activations).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

log = logging.getLogger(__name__)


PROC_STATUS = "/proc/self/status"  # Linux (4.7+) reports the umask here as `Umask:\t0022`


def process_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux reports it in /proc/self/status. Elsewhere (macOS, or /proc not mounted)
    `os.umask` is the only reader, and it reads by setting: the fallback sets 0o077 and
    puts the old mask back at once. That flip is process-wide and not thread-safe (a
    file another thread creates in between gets the stricter 0o077), so it happens only
    here, at write time, never at import.
    """
    try:
        with open(PROC_STATUS, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary open() gives a new file now: 0666 minus the umask.

    Files are created by mkstemp (mode 0600) and renamed into place; they get this
    mode, so results on a shared cluster are as readable as the user's other files."""
    return 0o666 & ~process_umask()


_CACHE_ROOT: ContextVar[str | None] = ContextVar("featbench_cache_root", default=None)


@contextlib.contextmanager
def using_cache(root: str | None) -> Iterator[None]:
    """Caches under `root` inside the block (a job's `paths.cache_dir`); None keeps the
    default. Scoped to the block and the current context, never process-wide."""
    token = _CACHE_ROOT.set(root)
    try:
        yield
    finally:
        _CACHE_ROOT.reset(token)


def cache_dir() -> Path:
    """Root of featbench's caches: the job's `paths.cache_dir` when set (`using_cache`),
    else `FEATBENCH_CACHE`, else ~/.cache/featbench."""
    root = (
        _CACHE_ROOT.get()
        or os.environ.get("FEATBENCH_CACHE")
        or Path.home() / ".cache" / "featbench"
    )
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: object) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write(path: Path, writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and rename the result onto `path`.

    The temporary file lives in the same folder (same filesystem), so the
    rename is atomic. On any error the temporary file is removed and the
    previous content of `path`, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- checksums checked once ---------------------------------------------------------
#
# Verifying a cache entry means hashing all of it (hundreds of MB for activations). A
# verified file gets a `<file>.verified` note of its checksum and its size, mtime and
# inode and of its first and last MiB; while those are unchanged, later reads trust the
# note instead of hashing again. A rewrite, truncation or replacement of the file changes
# them, and the next read hashes it again. (Like `make` trusting timestamps: a change in
# the middle of a file that also keeps its size, mtime and inode is not detected.)

VERIFIED_SUFFIX = ".verified"


EDGE = 1 << 20  # bytes at each end of a file hashed into its stamp: cheap, and catches
# the usual damage (a truncated or rewritten tail) even within one timestamp tick


def _stamp(path: Path) -> dict:
    stat = Path(path).stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE))
        handle.seek(max(0, stat.st_size - EDGE))
        digest.update(handle.read(EDGE))
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "edges": digest.hexdigest()[:16],
    }


def is_verified(path: Path, checksum: str) -> bool:
    """True when `path` was verified against `checksum` and has not changed since."""
    try:
        note = json.loads(Path(f"{path}{VERIFIED_SUFFIX}").read_text(encoding="utf-8"))
        return note == {**_stamp(path), "checksum": checksum}
    except (OSError, ValueError):
        return False


def mark_verified(path: Path, checksum: str) -> None:
    """Record that `path`, as it is now, matches `checksum` (see `is_verified`)."""
    atomic_write_text(
        Path(f"{path}{VERIFIED_SUFFIX}"), json.dumps({**_stamp(path), "checksum": checksum})
    )


@contextlib.contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `<path>.lock`, held for the block.

    Used around "check the cache, build if missing" so two jobs never build
    the same entry at once; the second one waits and then finds it built.
    """
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
