"""The proxy's Prometheus metrics: its own counters, after llama-server's, in the text format."""

from __future__ import annotations

import asyncio
import collections
import contextlib

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The proxy's own counters, in Prometheus' text format; `engine` gives the restarts and readiness."""

    def __init__(self, engine):
        self.engine = engine
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status)
        self.rejected: collections.Counter = collections.Counter()  # reason
        self.in_flight = 0

    def count(self, endpoint: str, status: int, rejected: str | None) -> None:
        self.requests[endpoint, status] += 1
        if rejected:
            self.rejected[rejected] += 1

    def text(self) -> str:
        lines = [
            "# HELP cpuforge_requests_total Requests answered by the proxy, by endpoint and status.",
            "# TYPE cpuforge_requests_total counter",
            *(f'cpuforge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
              for (e, s), n in sorted(self.requests.items())),  # fmt: skip
            "# HELP cpuforge_rejected_total Requests refused before they reached llama-server, by reason.",
            "# TYPE cpuforge_rejected_total counter",
            *(f'cpuforge_rejected_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejected.items())),
            "# HELP cpuforge_requests_in_flight Requests taken and not yet answered, this one included.",
            "# TYPE cpuforge_requests_in_flight gauge",
            f"cpuforge_requests_in_flight {self.in_flight}",
            "# HELP cpuforge_llama_server_restarts_total Times llama-server died and was brought back.",
            "# TYPE cpuforge_llama_server_restarts_total counter",
            f"cpuforge_llama_server_restarts_total {self.engine.restarts}",
            "# HELP cpuforge_llama_server_ready Whether llama-server has the model loaded and answers.",
            "# TYPE cpuforge_llama_server_ready gauge",
            f"cpuforge_llama_server_ready {int(self.engine.ready)}",
        ]
        return "\n".join(lines) + "\n"

    async def scrape(self, upstream) -> str:
        """What /metrics shows: llama-server's own figures first (slots, tokens, throughput), then ours,
        which come even when llama-server is down or hangs."""
        import aiohttp

        text = self.text()
        if self.engine.ready:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with upstream.get("/metrics", timeout=aiohttp.ClientTimeout(total=5)) as answer:
                    if answer.status == 200:
                        text = await answer.text() + text
        return text
