"""What /metrics reports: the server's counters and the engine's load, as Prometheus text."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds: smooth, still current


@dataclass
class ServerStats:
    """Counters of one server; touched only on the event loop."""

    started: float = field(default_factory=time.time)
    requests_total: dict = field(default_factory=dict)  # finish reason ("stop", "length", "abort", ...) -> count
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    recent: deque = field(default_factory=deque)  # (time, tokens) over the last RATE_WINDOW_S

    def add_tokens(self, n: int) -> None:
        if not n:
            return
        now = time.time()
        self.generation_tokens_total += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def count_finished(self, reason: str) -> None:
        self.requests_total[reason] = self.requests_total.get(reason, 0) + 1

    def tokens_per_s(self) -> float:
        now = time.time()
        return sum(n for t, n in self.recent if t >= now - RATE_WINDOW_S) / RATE_WINDOW_S


def prometheus_text(stats: ServerStats, running: int, waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> str:
    gauges = [
        ("lowbit_requests_running", "gauge", "sequences in the running batch", running),
        ("lowbit_requests_waiting", "gauge", "sequences accepted but not yet running", waiting),
        ("lowbit_kv_blocks_used", "gauge", "KV cache blocks held by sequences", kv_blocks_used),
        ("lowbit_kv_blocks_total", "gauge", "KV cache blocks allocated", kv_blocks_total),
        ("lowbit_prompt_tokens_total", "counter", "prompt tokens submitted", stats.prompt_tokens_total),
        ("lowbit_generation_tokens_total", "counter", "tokens generated", stats.generation_tokens_total),
        ("lowbit_generation_tokens_per_second", "gauge",
         f"tokens generated per second over the last {RATE_WINDOW_S:.0f}s", round(stats.tokens_per_s(), 3)),
    ]
    out = []
    for name, kind, help_, value in gauges:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    out += ["# HELP lowbit_requests_finished_total requests finished, by reason (abort: the client went away)",
            "# TYPE lowbit_requests_finished_total counter"]
    out += [f'lowbit_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(stats.requests_total.items())]
    return "\n".join(out) + "\n"
