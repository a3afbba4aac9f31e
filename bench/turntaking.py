"""Turn-taking metrics of a two-party conversation, from the audio of each party.

The definitions follow dGSLM (Nguyen et al., 2023) and SyncLLM (Veluri et al.,
2024), which compare generated dialogues with Fisher by these statistics, and
Heldner & Edlund (2010) for the floor-transfer offset:

- VAD: webrtcvad with an energy floor (speech_encoder/vad.py) on each 20 ms
  frame of each channel.
- IPU (inter-pausal unit): a stretch of one channel's speech holding no silence
  of ``MIN_PAUSE_S`` (0.2 s) or more; bursts shorter than ``MIN_IPU_S`` are
  clicks, not speech, and are dropped.
- pause: a silence of both channels between two IPUs of the same speaker.
- gap: a silence of both channels between IPUs of different speakers.
- overlap: a stretch where both channels are inside an IPU.
- floor transfer: the floor passes from X to Y when an IPU of Y outlasts X's
  speech; an IPU of Y that lies inside X's speech (a backchannel) leaves the
  floor with X. FTO (floor-transfer offset) = start of Y's IPU - end of X's
  last IPU: positive for a gap, negative for an overlap.
- interruption: a floor transfer in overlap (FTO < 0): Y began while X was
  speaking and X stopped first.
- talk-over episode: an overlap of ``TALK_OVER_S`` (1 s) or more: neither
  speaker yields quickly (longer than a backchannel or a clean barge-in).
- talk-over loop: ``LOOP_MIN`` (3) or more overlaps in a row, each starting
  within ``LOOP_WINDOW_S`` (5 s) of the end of the one before: the speakers
  keep colliding instead of settling who talks.
- deadlock: both silent for more than ``DEADLOCK_S`` (3 s) once the
  conversation has begun (a silence that runs into the end counts).

Times are seconds from the start of the recording; rates are per minute of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.config import SAMPLE_RATE
from speech_encoder.vad import FRAME_SAMPLES, Endpointer

FRAME_S = FRAME_SAMPLES / SAMPLE_RATE  # 20 ms
MIN_PAUSE_S = 0.2
MIN_IPU_S = 0.1
TALK_OVER_S = 1.0
LOOP_MIN = 3
LOOP_WINDOW_S = 5.0
DEADLOCK_S = 3.0


@dataclass(frozen=True)
class Segment:
    start: float  # s
    end: float  # s
    speaker: str = ""  # who spoke (IPUs), or who spoke before it (silences)
    next_speaker: str = ""  # silences: who spoke after it

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Transfer:
    t: float  # start of the new speaker's IPU, s
    source: str
    target: str
    fto: float  # floor-transfer offset, s: > 0 gap, < 0 overlap


@dataclass(frozen=True)
class Analysis:
    duration_s: float
    ipus: dict[str, list[Segment]]  # speaker -> IPUs in time order
    pauses: list[Segment]
    gaps: list[Segment]
    overlaps: list[Segment]
    transfers: list[Transfer]
    deadlocks: list[Segment]

    @property
    def interruptions(self) -> list[Transfer]:
        return [t for t in self.transfers if t.fto < 0]

    @property
    def talk_overs(self) -> list[Segment]:
        return [o for o in self.overlaps if o.duration >= TALK_OVER_S]

    def talk_over_loops(self) -> list[list[Segment]]:
        """Runs of LOOP_MIN or more overlaps, each within LOOP_WINDOW_S of the previous one."""
        runs, run = [], []
        for o in self.overlaps:
            if run and o.start - run[-1].end > LOOP_WINDOW_S:
                runs.append(run)
                run = []
            run.append(o)
        runs.append(run)
        return [r for r in runs if len(r) >= LOOP_MIN]

    def metrics(self) -> dict:
        minutes = self.duration_s / 60
        all_ipus = sorted((u for us in self.ipus.values() for u in us), key=lambda u: u.start)
        return {
            "duration_s": round(self.duration_s, 3),
            "ipu": describe([u.duration for u in all_ipus], minutes),
            "ipu_per_speaker": {s: len(us) for s, us in self.ipus.items()},
            "speech_s": {s: round(sum(u.duration for u in us), 3) for s, us in self.ipus.items()},
            "pause": describe([p.duration for p in self.pauses], minutes),
            "gap": describe([g.duration for g in self.gaps], minutes),
            "overlap": describe([o.duration for o in self.overlaps], minutes),
            "fto": describe([t.fto for t in self.transfers], minutes),
            "floor_transfers": len(self.transfers),
            "interruptions": len(self.interruptions),
            "talk_over_episodes": len(self.talk_overs),
            "talk_over_loops": len(self.talk_over_loops()),
            "deadlocks": len(self.deadlocks),
            "deadlock_s": [round(d.duration, 3) for d in self.deadlocks],
            # pause: a speaker stalled mid-turn; gap: nobody took the floor; end: the talk died out.
            "deadlock_kinds": {"pause": sum(d.next_speaker == d.speaker for d in self.deadlocks),
                               "gap": sum(d.next_speaker not in ("", d.speaker) for d in self.deadlocks),
                               "end": sum(d.next_speaker == "" for d in self.deadlocks)},
            "fto_s": [round(t.fto, 3) for t in self.transfers],
            "fto_s_by_direction": {f"{x}->{y}": [round(t.fto, 3) for t in self.transfers
                                                 if (t.source, t.target) == (x, y)]
                                   for x in self.ipus for y in self.ipus if x != y},
        }


def describe(xs: list[float], minutes: float) -> dict:
    """Count, rate per minute and distribution (mean, median, p10, p90, total) of durations in s."""
    out = {"count": len(xs), "per_min": round(len(xs) / minutes, 2) if minutes > 0 else None}
    if not xs:
        return out | {"mean": None, "median": None, "p10": None, "p90": None, "total_s": 0.0}
    a = np.asarray(xs, float)
    return out | {"mean": round(float(a.mean()), 3), "median": round(float(np.median(a)), 3),
                  "p10": round(float(np.percentile(a, 10)), 3), "p90": round(float(np.percentile(a, 90)), 3),
                  "total_s": round(float(a.sum()), 3)}


# -- one channel -------------------------------------------------------------------------------

def voiced_frames(audio: np.ndarray, aggressiveness: int = 2) -> np.ndarray:
    """One bool per 20 ms frame of float32 16 kHz ``audio``: does it hold speech."""
    vad = Endpointer(aggressiveness)
    n = len(audio) // FRAME_SAMPLES
    return np.array([vad.is_speech(audio[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]) for i in range(n)], bool)


def ipus(voiced: np.ndarray, speaker: str = "", frame_s: float = FRAME_S,
         min_pause_s: float = MIN_PAUSE_S, min_ipu_s: float = MIN_IPU_S) -> list[Segment]:
    """IPUs of one channel from its per-frame VAD: voiced runs joined across silences shorter than ``min_pause_s``."""
    v = np.concatenate([[False], np.asarray(voiced, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(v))
    runs = [[float(s * frame_s), float(e * frame_s)] for s, e in zip(edges[::2], edges[1::2])]
    joined: list[list[float]] = []
    for run in runs:
        if joined and run[0] - joined[-1][1] < min_pause_s - 1e-9:
            joined[-1][1] = run[1]
        else:
            joined.append(run)
    return [Segment(round(s, 4), round(e, 4), speaker) for s, e in joined if e - s >= min_ipu_s - 1e-9]


# -- two channels ------------------------------------------------------------------------------

def overlaps(a: list[Segment], b: list[Segment]) -> list[Segment]:
    """Stretches where an IPU of ``a`` and one of ``b`` are both under way."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i].start, b[j].start), min(a[i].end, b[j].end)
        if end > start:
            out.append(Segment(start, end))
        if a[i].end < b[j].end:
            i += 1
        else:
            j += 1
    return out


def silences(ipus_by_time: list[Segment], end_s: float) -> list[Segment]:
    """Stretches where nobody speaks, from the first IPU to ``end_s``, each with the
    speaker before it and the one after it ("" when the recording ends)."""
    out, block_end, last = [], None, ""
    for u in ipus_by_time:
        if block_end is not None and u.start > block_end:
            out.append(Segment(block_end, u.start, last, u.speaker))
        if block_end is None or u.end >= block_end:
            block_end, last = u.end, u.speaker
    if block_end is not None and end_s > block_end:
        out.append(Segment(block_end, end_s, last, ""))
    return out


def floor_transfers(ipus_by_time: list[Segment]) -> list[Transfer]:
    """Who holds the floor, IPU by IPU; a transfer when the other speaker's IPU outlasts the holder's speech."""
    out, holder, holder_end = [], None, 0.0
    for u in ipus_by_time:
        if holder is None or u.speaker == holder:
            holder, holder_end = u.speaker, max(holder_end, u.end)
        elif u.end > holder_end:
            out.append(Transfer(u.start, holder, u.speaker, round(u.start - holder_end, 4)))
            holder, holder_end = u.speaker, u.end
        # else: the IPU lies inside the holder's speech (a backchannel); the floor stays
    return out


def analyze(ipus_a: list[Segment], ipus_b: list[Segment], duration_s: float,
            names: tuple[str, str] | None = None) -> Analysis:
    """All the turn-taking events of two speakers' IPUs (each list in time order); ``names``
    keeps a speaker who never spoke in the results."""
    by_time = sorted(ipus_a + ipus_b, key=lambda u: (u.start, u.speaker))
    quiet = silences(by_time, duration_s)
    inner = [s for s in quiet if s.next_speaker]
    speakers = names or sorted({u.speaker for u in ipus_a} | {u.speaker for u in ipus_b})
    return Analysis(
        duration_s=duration_s,
        ipus={s: [u for u in by_time if u.speaker == s] for s in speakers},
        pauses=[s for s in inner if s.speaker == s.next_speaker],
        gaps=[s for s in inner if s.speaker != s.next_speaker],
        overlaps=overlaps(ipus_a, ipus_b),
        transfers=floor_transfers(by_time),
        deadlocks=[s for s in quiet if s.duration > DEADLOCK_S],
    )


def analyze_audio(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("A", "B"),
                  rate: int = SAMPLE_RATE) -> Analysis:
    """VAD over each channel (float32 mono at 16 kHz), then ``analyze``."""
    if rate != SAMPLE_RATE:
        raise ValueError(f"turn-taking VAD runs at {SAMPLE_RATE} Hz, got {rate}")
    duration = max(len(a), len(b)) / rate
    return analyze(ipus(voiced_frames(a), names[0]), ipus(voiced_frames(b), names[1]), duration, names)
