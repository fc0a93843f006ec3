"""Draftless speculative decoding as the server takes it: the settings of the pinned llama-server, and the
one the eval report chose for a model (cpuforge.evaluate.speculation measures them)."""

from __future__ import annotations

import logging
from pathlib import Path

from cpuforge.io.files import read_json
from cpuforge.paths import report_metrics

log = logging.getLogger(__name__)

PLAIN = "none"
AUTO = "auto"
# each draftless type of the pinned llama-server with its own defaults
SETTINGS: dict[str, list[str]] = {
    PLAIN: [],
    "ngram-simple": ["--spec-type", "ngram-simple"],
    "ngram-map-k": ["--spec-type", "ngram-map-k"],
    "ngram-mod": ["--spec-type", "ngram-mod"],
}


def serving_flags(model: Path, choice: str) -> list[str]:
    """llama-server's speculation flags for scripts.serve: `choice` a setting by name, or AUTO for the eval
    report's verdict on this model (results/{model}/report/metrics.json), plain decoding where it has none."""
    if choice != AUTO:
        return SETTINGS[choice]
    metrics = report_metrics(model)
    spec = read_json(metrics).get("speculation") if metrics.is_file() else None
    if not spec or not spec.get("setting"):
        log.info("speculation: none (%s)", "the report found no setting that wins" if spec else f"none in {metrics}")
        return []
    log.info("speculation: %s, which won in %s", spec["setting"], metrics)
    return spec["flags"]
