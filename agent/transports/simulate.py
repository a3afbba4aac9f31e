"""Two agents talk to each other over a simulated network, in real time.

SyncLLM's experiment (Veluri et al., 2024) as a tool: two full-duplex agents
converse while the link between them delays, jitters and drops their audio,
and turn-taking statistics show how much latency the conversation survives.

Both agents share one loaded ``Engine``; each has its own ``Session`` (persona,
history, KV cache) and its own ``ChunkClock``, both started together on one
event loop, so media time is the same clock at both ends. On tick k (time
(k+1)T) an agent takes every packet that has arrived from the other, places it
by its playout time in its ``InputBuffer`` (which undoes reordering and plays
silence for what is missing), steps its session with chunk k, and sends the
chunk it returns, which plays at its end over [(k+1)T, (k+2)T), into the link
towards the other (agent/transports/link.py). So A's audio for media time
[t, t+T) is heard by B over [t + d, t + d + T), d the link's mouth-to-ear delay.

Each agent hears only the other's output, never its own: there is no acoustic
path from an agent's voice back to its own input, so no echo cancellation is
needed (the other agent's output holds nothing of its voice either).

Outputs in ``out_dir``: conversation.wav (A left, B right, each on its own
timeline, as a listener between them hears them), transcript.txt,
events_a/b.jsonl, timeline_a/b.jsonl, timeline.png and metrics.json (turn-taking
as a listener hears it and as each agent hears it, the sessions' own figures,
the links' counts, and per floor transfer the offset minus the new speaker's
own reaction time: the link's share, apart from the models' time).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.clock import ChunkClock, InputBuffer
from agent.config import SAMPLE_RATE
from agent.engine import Engine
from agent.events import AgentSpeechEnd, AgentText, Event, TranscriptEvent, Turn
from agent.session import Session
from agent.transports.link import Link, LinkConfig
from agent.transports.replay import summarize, write_session_logs, write_stereo
from bench import plots
from bench.turntaking import Analysis, analyze_audio

log = logging.getLogger(__name__)

# Short, concrete instructions: Qwen2.5-0.5B echoes the other side's words back
# under longer, looser personas.
PERSONA_A = (
    "You are Sam, talking on the phone with your friend Alex. You are planning a trip to Portugal and "
    "Alex knows the country well. Say one short sentence about Alex's tip in your own words, then ask "
    "Alex a new question about the trip: food, trains, beaches, weather, money or where to sleep. "
    "Keep it under 25 words. Plain spoken words only."
)
PERSONA_B = (
    "You are Alex, talking on the phone with your friend Sam, who is planning a trip to Portugal. "
    "You know Portugal well. Answer Sam's question with one concrete tip, a place, a dish or a price, "
    "in one or two short sentences, under 25 words. Plain spoken words only."
)
OPENING_A = "Hey Alex! I'm finally planning that trip to Portugal next month. Where should I start?"

@dataclass(frozen=True)
class AgentSpec:
    name: str
    persona: str
    opening: str | None = None  # said at the start, before anyone has spoken


@dataclass(frozen=True)
class SimulationOptions:
    duration_s: float = 60.0  # conversation length, s of media time (run in real time)
    link: LinkConfig = LinkConfig()  # both directions alike, each with its own random draws
    seed: int = 0
    opening_at_s: float = 0.5  # when the first agent says its opening line


@dataclass
class Party:
    """One end of the call: a session, what it heard and what it said, chunk by chunk."""

    spec: AgentSpec
    session: Session
    inbox: InputBuffer
    heard: list[np.ndarray] = field(default_factory=list)  # input chunk k: media [kT, (k+1)T)
    said: list[np.ndarray] = field(default_factory=list)  # output chunk k: media [(k+1)T, (k+2)T)


async def _drive(party: Party, clock: ChunkClock, ticks: int, hear: Link, speak: Link, opening_tick: int) -> None:
    """Run one agent's ticks: receive, step, send."""
    for _ in range(ticks):
        k = await clock.tick()
        now = (k + 1) * clock.chunk_s
        for packet in hear.receive(now):
            party.inbox.put(packet.playout, packet.samples)
        chunk = party.inbox.take(k)
        out = party.session.step(chunk)
        party.heard.append(chunk)
        party.said.append(out)
        speak.send(now, now, out)
        if party.spec.opening and k == opening_tick:
            party.session.say(party.spec.opening)


async def simulate(engine: Engine, a: AgentSpec, b: AgentSpec, out_dir: Path,
                   options: SimulationOptions = SimulationOptions()) -> dict:
    """Let ``a`` and ``b`` talk for ``options.duration_s`` in real time; write the outputs; return the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = engine.config.chunk_samples
    tick = n / SAMPLE_RATE
    ticks = math.ceil(options.duration_s / tick)
    parties = [Party(spec, Session(engine, system_prompt=spec.persona), InputBuffer(n, SAMPLE_RATE))
               for spec in (a, b)]
    for p in parties:
        await p.session.warm_up()
    to_b, to_a = Link(options.link, options.seed), Link(options.link, options.seed + 1)
    clocks = [ChunkClock(tick), ChunkClock(tick)]
    opening_tick = round(options.opening_at_s / tick)
    try:
        async with asyncio.TaskGroup() as tg:  # one side failing stops the other
            tg.create_task(_drive(parties[0], clocks[0], ticks, to_a, to_b, opening_tick), name="duplex-sim-a")
            tg.create_task(_drive(parties[1], clocks[1], ticks, to_b, to_a, opening_tick), name="duplex-sim-b")
    finally:
        for p in parties:
            await p.session.close()
    return write_outputs(out_dir, parties, clocks, options, {"A->B": to_b, "B->A": to_a})


def write_outputs(out_dir: Path, parties: list[Party], clocks: list[ChunkClock], options: SimulationOptions,
                  links: dict[str, Link]) -> dict:
    """Write every output of one run to ``out_dir``; return the metrics (also in metrics.json)."""
    a, b = parties
    n = len(a.heard[0])
    said = [np.concatenate([np.zeros(n, np.float32)] + p.said[:-1]) for p in parties]  # on each one's timeline
    heard = [np.concatenate(p.heard) for p in parties]
    duration = len(heard[0]) / SAMPLE_RATE
    names = (a.spec.name, b.spec.name)
    write_stereo(out_dir / "conversation.wav", said[0], said[1])
    for p in parties:
        write_session_logs(out_dir, p.session, suffix="_" + p.spec.name.lower())
    (out_dir / "transcript.txt").write_text(transcript(parties))
    listener = analyze_audio(said[0], said[1], names)
    link = options.link
    metrics = {
        "duration_s": round(duration, 3),
        "chunk_ms": a.session.config.chunk_ms,
        "link": dataclasses.asdict(link) | {"mouth_to_ear_ms": round(link.mouth_to_ear_s * 1000, 1)},
        "seed": options.seed,
        "listener": listener.metrics(),
        "fto_minus_reaction_s": link_shares(listener, parties),
        # As each agent hears the call: its own voice, and the other's after the link.
        f"heard_by_{names[0].lower()}": analyze_audio(said[0], heard[0], names).metrics(),
        f"heard_by_{names[1].lower()}": analyze_audio(heard[1], said[1], names).metrics(),
        "sessions": {p.spec.name: summarize(p.session, c, duration, []) | {
            "missing_input_chunks": p.inbox.missing_chunks, "late_input_samples": p.inbox.late_samples}
            for p, c in zip(parties, clocks)},
        "links": {k: dataclasses.asdict(v.stats) for k, v in links.items()},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = (f"{names[0]} / {names[1]}: one-way {link.latency_ms:.0f} ms, jitter {link.jitter_ms:.0f} ms, "
             f"loss {link.loss:.0%}, {duration:.0f} s")
    plots.timeline_png(out_dir / "timeline.png", listener, title)
    return metrics


def link_shares(listener: Analysis, parties: list[Party]) -> list[float]:
    """Per floor transfer: its FTO minus the new speaker's own reaction time (its turn's latency,
    from the end it heard to its first audio), s. What is left is what the link added (plus the
    few tens of ms between the VAD's and the session's edges), apart from the models' time."""
    turns = {p.spec.name: [e for e in p.session.events if isinstance(e, Turn)] for p in parties}
    out = []
    for t in listener.transfers:
        turn = next((u for u in turns[t.target] if abs(t.t - u.agent_start) <= 0.4), None)
        if turn is not None:
            out.append(round(t.fto - turn.latency, 3))
    return out


def transcript(parties: list[Party]) -> str:
    """What each agent said (text sent to its voice) and heard (its Whisper transcript), by media time."""
    lines: list[tuple[float, str]] = []
    for p in parties:
        name = p.spec.name
        for e in p.session.events:
            lines.extend((e.t, line) for line in _transcript_lines(name, e))
    header = ("# media time, s. 'A:' text A sent to its voice; '(B heard)' B's transcript of what reached it;\n"
              "# '(A cut off)' A stopped mid-reply because the other talked over it.\n")
    return header + "".join(f"[{t:7.2f}s] {text}\n" for t, text in sorted(lines, key=lambda x: x[0]))


def _transcript_lines(name: str, e: Event) -> list[str]:
    if isinstance(e, AgentText):
        return [f"{name}: {e.text}"]
    if isinstance(e, TranscriptEvent):
        return [f"    ({name} heard) {e.text}"]
    if isinstance(e, AgentSpeechEnd) and e.reason == "interrupted":
        return [f"    ({name} cut off)"]
    return []


def default_agents(persona_a: str | None = None, persona_b: str | None = None,
                   opening_a: str | None = None) -> tuple[AgentSpec, AgentSpec]:
    return (AgentSpec("A", persona_a or PERSONA_A, OPENING_A if opening_a is None else opening_a or None),
            AgentSpec("B", persona_b or PERSONA_B))


# -- a sweep over latency ----------------------------------------------------------------------

async def sweep(engine: Engine, a: AgentSpec, b: AgentSpec, out_dir: Path, latencies_ms: list[float],
                options: SimulationOptions = SimulationOptions()) -> dict[float, dict]:
    """One simulation per one-way latency (in ``out_dir/latency-XXXms`` when there are several)."""
    out_dir = Path(out_dir)
    results = {}
    for latency in latencies_ms:
        run_dir = out_dir if len(latencies_ms) == 1 else out_dir / f"latency-{latency:03.0f}ms"
        link = dataclasses.replace(options.link, latency_ms=latency)
        log.info("simulating %.0f s at %.0f ms one-way -> %s", options.duration_s, latency, run_dir)
        results[latency] = await simulate(engine, a, b, run_dir, dataclasses.replace(options, link=link))
    plots.fto_png(out_dir / "fto.png", {f"{k:.0f} ms": m["listener"]["fto_s"] for k, m in results.items()},
                  "floor-transfer offset by one-way latency (as a listener between the agents hears it)")
    rows = [sweep_row(k, m) for k, m in results.items()]
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    return results


def sweep_row(latency_ms: float, m: dict) -> dict:
    """The figures of one run that a sweep compares."""
    lis, sessions = m["listener"], m["sessions"]
    # At the ear of the agent that yields the floor, the other's answer comes a round trip later.
    names, waits = list(sessions), []
    for me, other in (names, names[::-1]):
        waits += m[f"heard_by_{me.lower()}"]["fto_s_by_direction"].get(f"{me}->{other}", [])
    # The agents' own reaction time (heard end of the other's turn -> own first audio): FTO minus this is the link.
    reactions = [t["latency"] for s in sessions.values() for t in s["turns"]]
    return {"latency_ms": latency_ms, "duration_s": m["duration_s"],
            "ipu_per_min": lis["ipu"]["per_min"], "pause_per_min": lis["pause"]["per_min"],
            "gap_per_min": lis["gap"]["per_min"], "overlap_per_min": lis["overlap"]["per_min"],
            "transfers_per_min": lis["fto"]["per_min"], "fto_median_s": lis["fto"]["median"],
            "fto_p10_s": lis["fto"]["p10"], "fto_p90_s": lis["fto"]["p90"],
            "fto_median_at_yielder_s": round(float(np.median(waits)), 3) if waits else None,
            "reaction_median_s": round(float(np.median(reactions)), 3) if reactions else None,
            "fto_minus_reaction_median_s": (round(float(np.median(m["fto_minus_reaction_s"])), 3)
                                            if m["fto_minus_reaction_s"] else None),
            "gap_median_s": lis["gap"]["median"], "overlap_median_s": lis["overlap"]["median"],
            "interruptions": lis["interruptions"], "talk_overs": lis["talk_over_episodes"],
            "talk_over_loops": lis["talk_over_loops"], "deadlocks": lis["deadlocks"],
            "barge_ins": sum(s["interruptions"] for s in sessions.values()),
            "turns": sum(len(s["turns"]) for s in sessions.values())}


def sweep_table(rows: list[dict]) -> str:
    """One line per latency; durations in ms."""
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f}"

    head = (f"{'one-way':>7} {'dur':>4} {'IPU/m':>6} {'pause/m':>7} {'gap/m':>6} {'ovl/m':>6} {'FT/m':>5} "
            f"{'FTO p10':>7} {'FTO med':>7} {'FTO p90':>7} {'yield med':>9} {'react':>5} {'link':>4} "
            f"{'intr':>4} {'talkov':>6} {'loops':>5} {'dlock':>5} {'barge':>5} {'turns':>5}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['latency_ms']:>5.0f}ms {r['duration_s']:>4.0f} {r['ipu_per_min'] or 0:>6.1f} "
            f"{r['pause_per_min'] or 0:>7.1f} {r['gap_per_min'] or 0:>6.1f} {r['overlap_per_min'] or 0:>6.1f} "
            f"{r['transfers_per_min'] or 0:>5.1f} {ms(r['fto_p10_s']):>7} {ms(r['fto_median_s']):>7} "
            f"{ms(r['fto_p90_s']):>7} {ms(r['fto_median_at_yielder_s']):>9} {ms(r['reaction_median_s']):>5} "
            f"{ms(r['fto_minus_reaction_median_s']):>4} {r['interruptions']:>4} {r['talk_overs']:>6} "
            f"{r['talk_over_loops']:>5} {r['deadlocks']:>5} {r['barge_ins']:>5} {r['turns']:>5}")
    return "\n".join(lines)
