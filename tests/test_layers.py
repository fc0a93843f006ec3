"""The library's layers point one way: `lint-imports` keeps pyproject.toml's contracts (the packages in the
order README's "Where the code is" draws them, and no two modules or packages importing each other)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_imports_keep_the_layer_contracts():
    # the venv's own lint-imports (installed by ./install.sh --test); the graph is built afresh, no cache written
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"an import breaks a layer contract:\n{result.stdout}{result.stderr}"
