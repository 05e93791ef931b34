"""A node's NIC as a processor-sharing queue of fetches (fair-share bandwidth).

Cold-start fetches share the NIC equally. Background fetches (consolidation: a full worker
fetching the layers it lacks) run at low priority: they get the NIC only while no cold-start
fetch is running, so they never delay one.

Used two ways with the same code: inside the cluster model, where the planner predicts when each
fetch ends and refuses a new fetch that would push an existing one past its deadline
(HydraServe's rule, docs/PLACEMENT.md step 3), and inside the simulator, where a Nic with the node's true
bandwidth decides when simulated fetches really end. Times are the caller's clock (``now``).
"""

from __future__ import annotations

from dataclasses import dataclass

EPS_S = 1e-6


@dataclass
class Fetch:
    """One download into a node: bits left, the time it must end by, and its concurrency record."""

    key: str
    remaining_bits: float
    deadline: float
    started_at: float
    bits_total: float
    shared_time: float = 0.0  # integral of (fetches sharing the NIC) dt, for calibration
    background: bool = False

    def mean_sharing(self, now: float) -> float:
        """Average number of fetches this one shared the NIC with (itself included)."""
        elapsed = now - self.started_at
        return self.shared_time / elapsed if elapsed > EPS_S else 1.0


class Nic:
    """Fetches on one NIC share ``bps`` equally; finished fetches drop out as time advances."""

    def __init__(self, bps: float, now: float = 0.0) -> None:
        if bps <= 0:
            raise ValueError("bandwidth must be positive")
        self.bps = bps
        self.fetches: dict[str, Fetch] = {}
        self.updated_at = now
        self.finished: list[tuple[Fetch, float]] = []  # (fetch, end time) since last drain

    def __len__(self) -> int:
        """Cold-start (foreground) fetches: the ones that share the NIC with a new one."""
        return sum(1 for f in self.fetches.values() if not f.background)

    def _active(self) -> list[Fetch]:
        """Who has the NIC now: the foreground fetches, or else the background ones."""
        fg = [f for f in self.fetches.values() if not f.background]
        return fg or list(self.fetches.values())

    def advance(self, now: float) -> None:
        """Move fetches forward to ``now`` under fair sharing; finished ones go to ``finished``."""
        t = self.updated_at
        if now <= t:
            return
        while self.fetches and t < now:
            active = self._active()
            n = len(active)
            rate = self.bps / n
            smallest = min(f.remaining_bits for f in active)
            step = min(now - t, smallest / rate)
            for f in active:
                f.remaining_bits -= rate * step
                f.shared_time += n * step
            t += step
            for f in active:
                if f.remaining_bits <= rate * EPS_S:
                    self.finished.append((self.fetches.pop(f.key), t))
        self.updated_at = now

    def drain_finished(self) -> list[tuple[Fetch, float]]:
        out, self.finished = self.finished, []
        return out

    def finish_times(self, now: float, extra_bits: float = 0.0) -> tuple[dict[str, float], float | None]:
        """When each foreground fetch ends if nothing else arrives (background ones yield); with
        ``extra_bits``, also a new foreground fetch's end.

        Processor sharing: sort by bits left; the k-th smallest ends after the (n-k) still
        running have each received its remaining bits.
        """
        self.advance(now)
        items = [(f.remaining_bits, f.key) for f in self.fetches.values() if not f.background]
        if not items:
            return {}, (now + extra_bits / self.bps if extra_bits > 0 else None)
        new_key = "\0new"
        if extra_bits > 0:
            items.append((extra_bits, new_key))
        items.sort()
        n = len(items)
        out: dict[str, float] = {}
        t, prev = now, 0.0
        for k, (bits, key) in enumerate(items):
            t += (bits - prev) * (n - k) / self.bps
            prev = bits
            out[key] = t
        new_end = out.pop(new_key, None)
        return out, new_end

    def admit(self, now: float, bits: float) -> tuple[bool, float, str | None]:
        """Would a new fetch of ``bits`` keep every running fetch within its deadline?

        Returns (ok, predicted end of the new fetch, key of the first fetch it would break).
        """
        if bits <= 0:
            return True, now, None
        if not self.fetches:  # the common case on a big cluster: an idle NIC
            self.updated_at = max(self.updated_at, now)
            return True, now + bits / self.bps, None
        ends, new_end = self.finish_times(now, bits)
        for key, end in ends.items():
            if end > self.fetches[key].deadline + EPS_S:
                return False, float(new_end or now), key
        return True, float(new_end or now), None

    def add(self, key: str, bits: float, deadline: float, now: float, background: bool = False) -> None:
        self.advance(now)
        if bits > 0:
            self.fetches[key] = Fetch(key, bits, deadline, now, bits, background=background)

    def remove(self, key: str, now: float) -> Fetch | None:
        self.advance(now)
        return self.fetches.pop(key, None)

    def next_finish(self, now: float) -> float | None:
        """Time the next fetch ends (the simulator schedules its event then)."""
        self.advance(now)
        if not self.fetches:
            return None
        active = self._active()
        return now + min(f.remaining_bits for f in active) * len(active) / self.bps
