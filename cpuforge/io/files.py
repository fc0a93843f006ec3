"""Files written atomically, read with one clear sentence when they are wrong, and hashed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from cpuforge.errors import InputError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield `path.partial` to write to; rename it to `path` only when the body succeeds.

    A killed or failed step leaves at most a `.partial` (and the body's own
    `.partial.*` scratch files), never a file or folder with the final name; the
    next run removes such leftovers first. The output gets the modes of the user's
    umask (see `umask_modes`), whatever the tool that wrote it chose.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")

    def clean():
        for leftover in [partial, *path.parent.glob(glob_escape(partial.name) + ".*")]:
            _remove(leftover)

    path.parent.mkdir(parents=True, exist_ok=True)
    clean()
    try:
        yield partial
    except BaseException:
        clean()
        raise
    umask_modes(partial)
    _remove(path)
    os.replace(partial, path)
    clean()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def umask_modes(path: Path) -> None:
    """Give `path` and everything under it the mode a plain `open`/`mkdir` gives under the umask:
    safetensors and other writers make a temporary file (mode 0600) and rename it, so a group
    sharing a project folder could not read the artifact. Executables stay executable."""
    mask = current_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o100
        p.chmod((0o777 if executable else 0o666) & ~mask)


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative name; hidden
    files such as Snakemake's .snakemake_timestamp are not content."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return {str(p.relative_to(path)): sha256_file(p) for p in files}


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found.") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}).") from None


def write_json(path: str | os.PathLike, record: dict, *, sort_keys: bool = False, ensure_ascii: bool = True) -> None:
    """`record` as indented JSON with a final newline, written atomically (the one way cpuforge writes JSON)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n")


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (a HF model)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
