"""Writing files so that an interrupted stage never leaves a half-written output behind."""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse


def umask_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give a new file or directory. tempfile creates them 0600 /
    0700 whatever the umask, which makes outputs unreadable to a teammate on a shared machine."""
    mask = os.umask(0o022)  # the only way to read it portably; set straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(path: str | Path) -> None:
    """Give a file, or a folder and everything in it, the umask's permissions: safetensors writes
    its files 0600 too."""
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, umask_mode(directory=p.is_dir()))


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        apply_umask(tmp)  # after the block: a writer may have replaced the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class DataError(ValueError):
    """Bad or missing input data; the message names the file."""


class DiskFull(OSError):
    """A write failed for want of space; the message names the output: `<path>: no space left on device`."""

    def __str__(self) -> str:
        return self.strerror


def no_space(err: BaseException) -> bool:
    """Whether `err` is a full disk: an OSError's ENOSPC, or a library's own error wrapping it
    (safetensors raises SafetensorError with the OS's text)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


@contextmanager
def staged_folder(path: str | Path):
    """Yield an empty temporary folder beside `path`; when the block succeeds, everything in it is
    renamed into `path` (renames, which need no space; what else `path` holds, such as DVC's
    .gitignore, stays). A failure, a full disk or a kill while writing leaves the previous files or
    none, never some new and some missing; a full disk is a DiskFull naming `path`. A staging
    folder left by a killed attempt is removed by the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.staged-"
    for stale in path.parent.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    try:
        yield tmp
        apply_umask(tmp)  # mkdtemp made it 0700
        path.mkdir(exist_ok=True)
        for item in sorted(tmp.iterdir()):
            if (path / item.name).is_dir() and not (path / item.name).is_symlink():
                shutil.rmtree(path / item.name)
            os.replace(item, path / item.name)
    except Exception as err:
        if no_space(err):
            raise DiskFull(errno.ENOSPC, f"{path}: no space left on device") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """A CSV with a header of `fields`, written whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def publish(staged: str | Path, path: str | Path) -> None:
    """Copy a finished file onto `path`, whole or not at all (from any folder or filesystem)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(staged, tmp)


class UnreadableFile(FileNotFoundError):
    """A file that is there but cannot be read (truncated, overwritten). A FileNotFoundError, so that
    every stage and command says it in one line, as it says a missing one."""


def unreadable(path: str | Path, err: BaseException) -> UnreadableFile:
    return UnreadableFile(f"{path}: cannot be read ({type(err).__name__}); write it again (dvc repro, or "
                          "dvc checkout for a cached output)")


def read_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise unreadable(path, err) from None


def load_tensors(path: str | Path) -> dict:
    """A safetensors file's tensors; a truncated or overwritten one is an UnreadableFile."""
    from safetensors.torch import load_file  # not at import: io is imported by every stage

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors' own error type, or an OSError
        raise unreadable(path, err) from None


def local_path(source: str | Path) -> Path | None:
    """The local path `source` names (a plain path or a file:// URI), or None for a URI of another
    scheme (models:/, runs:/, http://, ...). A one-letter scheme is a Windows drive, not a URI."""
    text = str(source)
    scheme = urlparse(text).scheme
    if scheme == "file":
        return Path(urlparse(text).path)
    return Path(text) if len(scheme) <= 1 else None


def chosen_weights(model: str | Path, model_ema: str | Path, weights: str) -> Path:
    """Of the two saved models a training stage writes, the one eval.weights names: raw averaged
    weights or EMA."""
    return Path(model if weights == "raw" else model_ema)
