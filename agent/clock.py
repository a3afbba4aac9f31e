"""The chunk clock: one user chunk in, one agent chunk out, every tick.

SyncLLM-style time sync: media time advances in fixed chunks of T seconds. On
tick k the session consumes the user audio of media time [kT, (k+1)T) and emits
the agent audio for [(k+1)T, (k+2)T). The clock never waits for a model: a user
chunk that has not arrived by its deadline is silence (counted), and an agent
chunk with nothing ready is silence (counted as an underrun while a reply is
still being made).

``ChunkClock`` paces ticks from start time + k*T (never drifts, whatever a tick
costs); ``InputBuffer`` places received audio by its media timestamp, so a
steady network delay does not shift decisions; ``Timeline`` records what each
tick held, the record benchmarks read.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


class ChunkClock:
    """Async ticks at start + (k+1)*T on the event loop's clock; records lateness."""

    def __init__(self, chunk_s: float, loop: asyncio.AbstractEventLoop | None = None):
        self.chunk_s = chunk_s
        self._loop = loop or asyncio.get_running_loop()
        self.start = self._loop.time()
        self.k = 0
        self.lags: list[float] = []  # seconds each tick ran after its deadline

    async def tick(self) -> int:
        """Wait for the next deadline; return the index of the user chunk now complete."""
        due = self.start + (self.k + 1) * self.chunk_s
        await asyncio.sleep(max(0.0, due - self._loop.time()))
        self.lags.append(self._loop.time() - due)
        k, self.k = self.k, self.k + 1
        return k

    def jitter_ms(self) -> dict:
        lags = sorted(x * 1000 for x in self.lags)
        if not lags:
            return {}
        return {"p50": round(lags[len(lags) // 2], 2), "p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 2),
                "max": round(lags[-1], 2)}


class InputBuffer:
    """User audio placed by media time, taken out one chunk per tick.

    ``put(t, samples)`` may come early, late or out of order (a network);
    ``take(k)`` returns chunk k, with silence where nothing arrived in time.
    Audio older than the chunk being taken is dropped (too late: counted).
    """

    def __init__(self, chunk_samples: int, rate: int, max_ahead_chunks: int = 50):
        self.n = chunk_samples
        self.rate = rate
        self._slots: dict[int, np.ndarray] = {}
        self._next = 0
        self.max_ahead = max_ahead_chunks
        self.missing_chunks = 0  # chunks taken with no audio at all
        self.late_samples = 0  # samples that arrived after their chunk was taken
        self.early_samples = 0  # samples too far ahead of the clock to hold (bounded memory)

    def put(self, t: float, samples: np.ndarray) -> None:
        pos, src = int(round(t * self.rate)), samples
        while len(src):
            k, off = divmod(pos, self.n)
            take = min(self.n - off, len(src))
            if k < self._next:
                self.late_samples += take
            elif k < self._next + self.max_ahead:
                slot = self._slots.setdefault(k, np.zeros(self.n, np.float32))
                slot[off:off + take] = src[:take]
            else:
                self.early_samples += take
            pos, src = pos + take, src[take:]

    @property
    def open_from(self) -> float:
        """Media time (s) from which audio can still be placed: the start of the next chunk."""
        return self._next * self.n / self.rate

    def take(self, k: int) -> np.ndarray:
        for old in [j for j in self._slots if j < k]:
            del self._slots[old]
        self._next = k + 1
        chunk = self._slots.pop(k, None)
        if chunk is None:
            self.missing_chunks += 1
            return np.zeros(self.n, np.float32)
        return chunk


@dataclass(frozen=True)
class TickRecord:
    k: int
    t: float  # media time of the user chunk's start, s
    user_rms: float
    agent_rms: float  # of the agent chunk emitted this tick (plays one tick later)
    state: str
    decision: str  # what the session decided this tick ("" when nothing)
    text: str  # reply text in flight (sent to the voice, not yet fully played)


class Timeline:
    """The interleaved per-tick record of one session."""

    def __init__(self) -> None:
        self.ticks: list[TickRecord] = []

    def add(self, record: TickRecord) -> None:
        self.ticks.append(record)

    def write(self, path: Path) -> None:
        with open(path, "w") as f:
            for r in self.ticks:
                f.write(json.dumps(asdict(r)) + "\n")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0
