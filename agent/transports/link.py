"""A one-way network path for audio chunks: delay, jitter, loss and reordering.

The sender hands the link one chunk per tick, stamped with the media time it
plays over at the sender. Each packet is lost with probability ``loss``;
otherwise it spends ``latency_ms`` plus a random extra of up to ``jitter_ms`` in
flight, so with jitter above a chunk's length packets overtake each other. The
receiver keeps a jitter buffer of ``buffer_ms`` (as deep as the jitter unless
told otherwise) and plays a chunk sent for media time t at t + latency + buffer:
that is the mouth-to-ear delay, the same for every packet, so the audio is not
warped. Packets are re-stamped with that playout time and the receiver's
``InputBuffer`` puts them back in order by it; one that arrives after its
playout time is too late there (and counted), one that is lost never arrives,
and both are heard as silence (the simplest concealment).

Times are seconds on one clock shared by both ends (the simulation's media
time, which its chunk clocks keep on wall time).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinkConfig:
    latency_ms: float = 0.0  # one-way network delay, the constant part
    jitter_ms: float = 0.0  # extra delay of each packet, uniform in [0, jitter_ms]
    loss: float = 0.0  # probability that a packet never arrives, 0..1
    buffer_ms: float | None = None  # receiver's jitter buffer; None: jitter_ms (nothing arrives late)

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0 or (self.buffer_ms or 0) < 0:
            raise ValueError("latency, jitter and buffer must be >= 0 ms")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")

    @property
    def mouth_to_ear_s(self) -> float:
        """The delay the listener hears: network latency plus jitter buffer, s."""
        buffer = self.jitter_ms if self.buffer_ms is None else self.buffer_ms
        return (self.latency_ms + buffer) / 1000


@dataclass(frozen=True)
class Packet:
    arrival: float  # when it reaches the receiver, s
    playout: float  # media time the receiver plays its first sample at, s
    samples: np.ndarray


@dataclass(frozen=True)
class LinkStats:
    sent: int
    lost: int
    reordered: int  # packets that arrived before one sent earlier


class Link:
    """Packets in flight from one agent to the other, released by arrival time."""

    def __init__(self, config: LinkConfig, seed: int = 0):
        self.config = config
        self._rng = np.random.default_rng(seed)
        self._flight: list[tuple[float, int, Packet]] = []  # heap by arrival, then send order
        self._seq = 0
        self._last_delivered_seq = -1
        self._lost = 0
        self._reordered = 0

    def send(self, sent_at: float, media_t: float, samples: np.ndarray) -> None:
        """Put a chunk on the wire at time ``sent_at``; it plays at the sender from ``media_t``."""
        seq, self._seq = self._seq, self._seq + 1
        if self.config.loss and self._rng.random() < self.config.loss:
            self._lost += 1
            return
        jitter = self._rng.uniform(0.0, self.config.jitter_ms) if self.config.jitter_ms else 0.0
        arrival = sent_at + (self.config.latency_ms + jitter) / 1000
        packet = Packet(arrival, media_t + self.config.mouth_to_ear_s, samples)
        heapq.heappush(self._flight, (arrival, seq, packet))

    def receive(self, now: float) -> list[Packet]:
        """Every packet that has arrived by ``now``, in arrival order."""
        out = []
        while self._flight and self._flight[0][0] <= now:
            _, seq, packet = heapq.heappop(self._flight)
            if seq < self._last_delivered_seq:
                self._reordered += 1
            self._last_delivered_seq = max(self._last_delivered_seq, seq)
            out.append(packet)
        return out

    @property
    def stats(self) -> LinkStats:
        return LinkStats(self._seq, self._lost, self._reordered)
