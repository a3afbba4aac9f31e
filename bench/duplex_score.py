"""Scoring of ``bench duplex``: who spoke when, read off the two-channel recording.

Speech is found by silero-vad, run on each channel of ``conversation.wav``
(left: user, right: agent): a detector independent of the agent's own
(webrtcvad), so the agent is not judged by its own ears. Where the user's part
was a noise, its interval comes from the script instead (the point is that it
is not speech).

Agent speech separated by less than ``AGENT_GAP_S`` is one stretch: the pauses
Piper leaves between clauses, and a voice that falls behind for a moment on a
loaded CPU, stay under it, while a stop followed by a new reply cannot (that
needs endpointing, Whisper and the LLM). A stretch "takes the turn" when it
lasts ``TAKE_S`` or holds more than ``TAKE_WORDS`` words (Full-Duplex-Bench's
rule: shorter sounds are backchannels).

All times are seconds on the recording's timeline.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np

from agent.config import SAMPLE_RATE

Span = tuple[float, float]  # (start, end), s
Words = Callable[[Span], str]  # the agent's words in a span (Whisper on the agent channel)

AGENT_GAP_S = 0.8
TAKE_S = 1.0
TAKE_WORDS = 3
STOP_WINDOW_S = 0.5  # after the user's sound: a stretch ending by then was stopped by it
MAX_RESPONSE_S = 30.0  # a reply later than this is no reply (generous: a loaded CPU is slow, latency tells)
NOISE_STOP_S = 2.0  # a distractor stops the agent within this of its onset, or not at all


class SileroVad:
    """silero-vad over a whole track: float32 mono 16 kHz -> speech spans."""

    def __init__(self) -> None:
        import torch

        threads = torch.get_num_threads()
        from silero_vad import get_speech_timestamps, load_silero_vad

        torch.set_num_threads(threads)  # importing silero_vad sets one thread; the engine wants its own
        self._model = load_silero_vad()
        self._timestamps = get_speech_timestamps

    def spans(self, audio: np.ndarray) -> list[Span]:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a small model on 32 ms windows: more threads only wait on each other
        try:
            found = self._timestamps(torch.from_numpy(np.ascontiguousarray(audio, np.float32)), self._model,
                                     sampling_rate=SAMPLE_RATE, min_speech_duration_ms=100,
                                     min_silence_duration_ms=100, speech_pad_ms=30)
        finally:
            torch.set_num_threads(threads)
        return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in found]


# -- spans -------------------------------------------------------------------------------------------

def merge(spans: Iterable[Span], gap: float = AGENT_GAP_S) -> list[Span]:
    """Join spans whose silence between is shorter than ``gap``."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if out and s - out[-1][1] < gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def within(spans: list[Span], window: Span) -> Span | None:
    """The extent of the speech overlapping ``window``, clipped to it; None if there is none."""
    inside = [(max(s, window[0]), min(e, window[1])) for s, e in spans if e > window[0] and s < window[1]]
    return (inside[0][0], inside[-1][1]) if inside else None


def covering(stretches: list[Span], t: float) -> Span | None:
    return next((s for s in stretches if s[0] <= t < s[1]), None)


def takes_turn(stretch: Span, words: Words | None = None) -> bool:
    if stretch[1] - stretch[0] >= TAKE_S:
        return True
    return words is not None and len(words(stretch).split()) > TAKE_WORDS


# -- per scenario ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PauseResult:
    took_over: bool  # the agent took the turn inside the user's turn
    spoke: bool  # any agent speech at all inside it (stricter than took_over)
    agent_speech_s: float  # agent speech inside the user's turn


def score_pause(user: list[Span], agent: list[Span], turn: Span, words: Words | None = None) -> PauseResult:
    """``turn``: the scripted interval of the long turn; the user's speech inside it bounds it."""
    bounds = within(user, turn) or turn
    inside = [a for a in merge(agent) if a[0] < bounds[1] and a[1] > bounds[0]]
    return PauseResult(any(takes_turn(a, words) for a in inside), bool(inside),
                       round(sum(min(e, bounds[1]) - max(s, bounds[0]) for s, e in inside), 3))


@dataclass(frozen=True)
class BackchannelResult:
    valid: bool  # the agent was speaking when the backchannel began
    resumed: bool  # it went on: no silence of AGENT_GAP_S or more around the backchannel
    gap_s: float  # the longest agent silence overlapping the backchannel (+ STOP_WINDOW_S); 0 if none


def score_backchannel(user: list[Span], agent: list[Span], part: Span) -> BackchannelResult:
    bc = within(user, part) or part
    stretch = covering(merge(agent), bc[0])
    if stretch is None:
        return BackchannelResult(False, False, 0.0)
    window = (bc[0], bc[1] + STOP_WINDOW_S)
    raw = sorted(agent)
    gaps = [(e, s2) for (_, e), (s2, _) in zip(raw, raw[1:]) if e < window[1] and s2 > window[0]]
    after = [s for s, _ in raw if s >= stretch[1]]
    if stretch[1] < window[1]:  # the agent fell silent inside the window: the gap runs to its next word
        gaps.append((stretch[1], after[0] if after else float("inf")))
    gap = max((b - a for a, b in gaps), default=0.0)
    return BackchannelResult(True, stretch[1] >= window[1], round(min(gap, 99.0), 3))


@dataclass(frozen=True)
class TurnResult:
    took_turn: bool
    latency_s: float | None  # first agent speech - end of the user's question


def score_turn(user: list[Span], agent: list[Span], part: Span, words: Words | None = None) -> TurnResult:
    question = within(user, part) or part
    reply = next((a for a in merge(agent) if a[1] > question[0]), None)
    if reply is None or reply[0] - question[1] > MAX_RESPONSE_S:
        return TurnResult(False, None)
    return TurnResult(takes_turn(reply, words), round(reply[0] - question[1], 3))


@dataclass(frozen=True)
class InterruptionResult:
    valid: bool  # the agent was speaking when the user cut in
    took_turn: bool  # it answered the cut-in
    stop_s: float | None  # agent silent - user onset
    latency_s: float | None  # the new reply's start - end of the cut-in
    relevant: bool  # the new reply holds one of the keywords
    reply_text: str = ""


def score_interruption(user: list[Span], agent: list[Span], part: Span, keywords: Iterable[str],
                       words: Words | None = None) -> InterruptionResult:
    cut = within(user, part) or part
    stretches = merge(agent)
    current = covering(stretches, cut[0])
    if current is None:
        return InterruptionResult(False, False, None, None, False)
    reply = next((a for a in stretches if a[0] >= current[1]), None)
    if reply is None or reply[0] - cut[1] > MAX_RESPONSE_S:
        return InterruptionResult(True, False, round(current[1] - cut[0], 3), None, False)
    text = words(reply) if words else ""
    relevant = any(k.lower() in text.lower() for k in keywords)
    return InterruptionResult(True, takes_turn(reply, words), round(current[1] - cut[0], 3),
                              round(reply[0] - cut[1], 3), relevant, text)


@dataclass(frozen=True)
class NoiseResult:
    placement: str  # during (the agent was speaking at the onset) | between
    stopped: bool  # the agent fell silent within NOISE_STOP_S (+ STOP_WINDOW_S) of the onset
    replied: bool  # the agent started speaking after the onset (a new stretch)

    @property
    def ok(self) -> bool:
        return not (self.stopped or self.replied)


def score_noise(agent: list[Span], part: Span) -> NoiseResult:
    """``part``: the distractor's scripted interval (it need not be speech)."""
    stretches = merge(agent)
    current = covering(stretches, part[0])
    stop_by = min(part[1], part[0] + NOISE_STOP_S) + STOP_WINDOW_S
    stopped = current is not None and current[1] < stop_by
    replied = any(s > part[0] for s, _ in stretches if current is None or s >= current[1])
    return NoiseResult("during" if current else "between", stopped, replied)


# -- over a category -----------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (linear interpolation), rounded to ms; None for no data."""
    return round(float(np.percentile(xs, q * 100)), 3) if xs else None


def rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 3) if flags else None


def summarize(category: str, results: list) -> dict:
    """Metrics of one category from its per-scenario results (dataclasses above)."""
    if category == "pause":
        return {"n": len(results), "tor": rate([r.took_over for r in results]),
                "any_speech_rate": rate([r.spoke for r in results])}
    if category == "backchannel":
        valid = [r for r in results if r.valid]
        return {"n": len(results), "n_valid": len(valid), "resume_rate": rate([r.resumed for r in valid]),
                "gap_p50_s": pct([r.gap_s for r in valid], 0.5), "gap_p90_s": pct([r.gap_s for r in valid], 0.9)}
    if category == "turntaking":
        lat = [r.latency_s for r in results if r.took_turn]
        return {"n": len(results), "tor": rate([r.took_turn for r in results]), "latency_p50_s": pct(lat, 0.5),
                "latency_mean_s": round(statistics.mean(lat), 3) if lat else None, "latency_p90_s": pct(lat, 0.9)}
    if category == "interruption":
        valid = [r for r in results if r.valid]
        stops = [r.stop_s for r in valid]
        lat = [r.latency_s for r in valid if r.took_turn]
        return {"n": len(results), "n_valid": len(valid), "tor": rate([r.took_turn for r in valid]),
                "stop_p50_s": pct(stops, 0.5), "stop_p90_s": pct(stops, 0.9),
                "latency_p50_s": pct(lat, 0.5), "latency_mean_s": round(statistics.mean(lat), 3) if lat else None,
                "relevance_rate": rate([r.relevant for r in valid if r.took_turn])}
    if category == "noise":
        out = {"n": len(results), "ok_rate": rate([r.ok for r in results]),
               "stop_rate": rate([r.stopped for r in results]), "reply_rate": rate([r.replied for r in results])}
        for placement in ("during", "between"):
            out[f"ok_rate_{placement}"] = rate([r.ok for r in results if r.placement == placement])
        return out
    raise ValueError(f"unknown category {category!r}")


RESULT_TYPES = {"pause": PauseResult, "backchannel": BackchannelResult, "turntaking": TurnResult,
                "interruption": InterruptionResult, "noise": NoiseResult}


def to_dict(result) -> dict:
    return asdict(result)


def from_dict(category: str, d: dict):
    return RESULT_TYPES[category](**d)
