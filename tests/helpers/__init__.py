"""What the tests share besides fixtures: tiny model builders, the workflow runner, the llama.cpp build and runtime,
the vocabulary models and the server launcher. conftest.py holds the fixtures that use them."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the repository's own package (not pip-installed), importable by every helper and test from here on
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
