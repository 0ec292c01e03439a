"""Where a long job's time went: named phases, timed and summed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Phases:
    """Sums the wall time of each named phase (a phase entered again adds to its sum).

    With `echo`, each phase prints one line as it ends (`[prefix] name: 1.23 s (cpu 1.20 s)`);
    `table()` gives every phase's sum and share of the time since the object was made.
    Phases may nest ("evaluations" around "evaluations: item table"): shares are each of
    the total, so nested ones are not to be added to their parent."""

    def __init__(self, prefix: str, echo: bool = False) -> None:
        self.prefix, self.echo = prefix, echo
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            took = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            if self.echo:
                cpu = time.process_time() - c0
                print(f"[{self.prefix}] {name}: {took:.2f} s (cpu {cpu:.2f} s)", flush=True)

    def total(self) -> float:
        return time.perf_counter() - self._t0

    def table(self) -> str:
        total = self.total()
        width = max((len(n) for n in self.seconds), default=0)
        rows = [f"[{self.prefix}] time split of {total:.1f} s:"]
        rows += [f"  {n:<{width}} {s:>9.1f} s {s / max(total, 1e-9):>6.1%}" for n, s in self.seconds.items()]
        return "\n".join(rows)
