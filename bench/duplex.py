"""``run_agent.py bench duplex``: full-duplex behaviour, in the manner of Full-Duplex-Bench.

Five categories of scripted conversations (bench/duplex_scenarios.py) go
through a transport in real time on the real models: replay (the session's
chunk clock, as ``run_agent.py replay``) or webrtc (a scripted aiortc caller
over loopback, web/client.py). Each run leaves its two-channel
``conversation.wav`` and is scored from that recording alone, with silero-vad
and Whisper on the agent's channel (bench/duplex_score.py):

    pause          takeover rate, TOR (lower is better)
    backchannel    resume rate, stop gap
    turntaking     TOR (higher is better), response latency
    interruption   TOR, stop latency, response latency, relevance of the new reply
    noise          no stop and no reply

Outputs in ``--out``: one folder per scenario (conversation.wav, events.jsonl,
scenario.json, score.json), ``results.json`` and ``results.md`` (our figures
beside the published ones). ``--resume`` keeps scenarios already scored, so a
long run can be stopped and continued.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from agent.config import SAMPLE_RATE, Config
from bench import duplex_score as score
from bench.duplex_scenarios import CATEGORIES, Scenario, Speaker, generate
from speech_encoder.audio import read_wav, write_wav

REPLAY_WAIT_S = 20.0  # give up on a scenario this long after the agent went quiet

# Full-Duplex-Bench v1 (Lin et al., 2025), synthetic sets: Freeze-Omni, Moshi, best reported.
PUBLISHED = {
    ("pause", "tor"): (0.642, 0.985, 0.010),
    ("turntaking", "tor"): (0.336, 0.941, 1.000),
    ("turntaking", "latency_mean_s"): (0.953, 0.265, 0.070),
    ("interruption", "tor"): (0.867, 1.000, 1.000),
    ("interruption", "latency_mean_s"): (1.409, 0.257, 0.257),
}
ROWS = (  # category, metric key, label, target
    ("pause", "tor", "TOR (lower is better)", "<= 0.05"),
    ("pause", "any_speech_rate", "any agent speech in the turn", ""),
    ("backchannel", "resume_rate", "resume rate", ">= 0.95"),
    ("backchannel", "gap_p90_s", "stop gap p90, s", ""),
    ("backchannel", "engine_stop_rate", "voice stopped for it (the engine's events, any time after)", ""),
    ("turntaking", "tor", "TOR (higher is better)", ">= 0.98"),
    ("turntaking", "latency_mean_s", "response latency mean, s", ""),
    ("turntaking", "latency_p50_s", "response latency p50, s", "<= 0.8"),
    ("turntaking", "decision_p50_chunks", "end of turn decided, chunks after the last word, p50", "<= 2"),
    ("interruption", "tor", "TOR (higher is better)", ">= 0.98"),
    ("interruption", "stop_p90_s", "stop latency p90, s", "<= 0.25"),
    ("interruption", "stop_p50_s", "stop latency p50, s", ""),
    ("interruption", "latency_mean_s", "response latency mean, s", ""),
    ("interruption", "relevance_rate", "new reply on topic (keywords)", ""),
    ("noise", "ok_rate", "no stop and no reply", ">= 0.95"),
    ("noise", "ok_rate_during", "... during an answer", ""),
    ("noise", "ok_rate_between", "... between turns", ""),
)


# -- one scenario ----------------------------------------------------------------------------------

def part_spans(scenario: Scenario, starts: list[float]) -> list[score.Span | None]:
    """Where each part of the script played (None: never reached, its trigger did not come)."""
    return [(t, t + p.duration) if t is not None else None
            for p, t in zip(scenario.parts, list(starts) + [None] * len(scenario.parts))]


def score_run(scenario: Scenario, run_dir: Path, vad: score.SileroVad, asr) -> dict:
    """Score one finished run from its conversation.wav and the script's start times."""
    stereo, rate = read_wav(run_dir / "conversation.wav")
    assert rate == SAMPLE_RATE
    user, agent = vad.spans(stereo[:, 0]), vad.spans(stereo[:, 1])
    summary = json.loads((run_dir / "summary.json").read_text())
    starts = summary["user_utterance_starts"]
    spans = part_spans(scenario, starts)
    heard: dict[score.Span, str] = {}

    def words(span: score.Span) -> str:
        if span not in heard:
            a = stereo[int(span[0] * SAMPLE_RATE):int(span[1] * SAMPLE_RATE), 1]
            heard[span] = asr.transcribe(a).text if len(a) else ""
        return heard[span]

    roles = {p.role: s for p, s in zip(scenario.parts, spans)}
    c = scenario.category
    if c == "pause":
        result = score.score_pause(user, agent, roles["turn"], words)
    elif c == "turntaking":
        result = score.score_turn(user, agent, roles["request"], words)
    elif c == "backchannel":
        result = (score.score_backchannel(user, agent, roles["backchannel"]) if roles["backchannel"]
                  else score.BackchannelResult(False, False, 0.0))
    elif c == "interruption":
        result = (score.score_interruption(user, agent, roles["interruption"], scenario.keywords, words)
                  if roles["interruption"] else score.InterruptionResult(False, False, None, None, False))
    else:
        result = score.score_noise(agent, roles["noise"]) if roles["noise"] else None
    scored = {"id": scenario.id, "category": c, "result": None if result is None else score.to_dict(result)}
    if c == "turntaking" and roles["request"] and (run_dir / "events.jsonl").exists():
        # The engine's own view (not the recording's): when it decided the turn was over.
        end = (score.within(user, roles["request"]) or roles["request"])[1]
        shift = media_offset(run_dir / "events.jsonl", user) if summary.get("transport") == "webrtc" else 0.0
        scored["turn_end_decision_s"] = decision_delay(run_dir / "events.jsonl", end + shift)
    if c == "backchannel" and roles["backchannel"] and (run_dir / "events.jsonl").exists():
        # The recording can miss a stop decided late (after its window): the engine's own word on it.
        shift = media_offset(run_dir / "events.jsonl", user) if summary.get("transport") == "webrtc" else 0.0
        scored["engine_stopped"] = stopped_after(run_dir / "events.jsonl", roles["backchannel"][0] + shift)
    return {**scored, "user_speech": [[round(a, 3), round(b, 3)] for a, b in user],
            "agent_speech": [[round(a, 3), round(b, 3)] for a, b in agent]}


def decision_delay(events_path: Path, user_end: float) -> float | None:
    """Seconds from the user's last word to the session's decision that the turn
    was over (the state head's interrupt, a timeout or the endpointer), as
    stamped in events.jsonl: the media time of the session's step in which the
    verdict came back (with 20 ms steps that includes the time Whisper and the
    LLM took; with whole-chunk steps, before 2026-11-28 afternoon, the chunk's end)."""
    for line in events_path.read_text().splitlines():
        e = json.loads(line)
        if (e["type"] == "decision" and e["state"] == "listening" and e["t"] >= user_end - 0.05
                and e["decision"] in ("interrupt", "timeout", "endpoint")):
            return round(e["t"] - user_end, 3)
    return None


def media_offset(events_path: Path, user: list[score.Span]) -> float:
    """Server media time minus recording time, for a call: the caller's recording
    starts with the agent's first frame to arrive (media time one chunk plus the
    way over) and the server places the user's audio a jitter allowance late, so
    the two clocks differ by a few tenths of a second. Estimated from the user's
    first onset as both saw it (the session's VAD, silero on the recording)."""
    onsets = [e["t"] for e in map(json.loads, events_path.read_text().splitlines())
              if e["type"] == "user_speech_start"]
    return round(onsets[0] - user[0][0], 3) if onsets and user else 0.0


def stopped_after(events_path: Path, t: float) -> bool:
    """The session stopped its voice for a cut-in at or after media time ``t`` (events.jsonl)."""
    return any(e["type"] == "agent_speech_end" and e["reason"] == "interrupted" and e["t"] >= t - 0.05
               for e in map(json.loads, events_path.read_text().splitlines()))


def run_replay(engine, scenario: Scenario, run_dir: Path) -> None:
    from agent.transports.replay import ReplayOptions, run_script

    asyncio.run(run_script(engine, scenario.script(), run_dir, ReplayOptions(max_wait_s=REPLAY_WAIT_S)))


# -- webrtc: the same script from an aiortc caller -------------------------------------------------

def last_of(events: list[dict], *kinds: str) -> str | None:
    """The type of the last event of one of ``kinds``; None if there is none."""
    return next((e["type"] for e in reversed(events) if e["type"] in kinds), None)


def idle(events: list[dict]) -> bool:
    """From the call's events: no user turn open and no reply in flight (as ``Session.idle``)."""
    state = next((e["state"] for e in reversed(events) if e["type"] == "state"), "listening")
    return state == "listening" and last_of(events, "user_speech_start", "user_speech_end") != "user_speech_start"


def agent_speaking(events: list[dict]) -> bool:
    return last_of(events, "agent_speech_start", "agent_speech_end") == "agent_speech_start"


async def wait_for_agent(client, kind: str, after: int) -> dict:
    """The agent's next ``kind`` event; gives up after REPLAY_WAIT_S with the agent
    silent. A long answer is waited out (a 20 s cap on the whole wait skipped the
    noise of scenarios whose answer ran past it), up to 10 such waits."""
    for _ in range(10):
        try:
            return await client.wait_for(lambda e: e["type"] == kind, REPLAY_WAIT_S, after)
        except TimeoutError:
            # Look again if it came as the wait ran out (the next wait finds it at once).
            if not agent_speaking(client.events) and last_of(client.events[after:], kind) is None:
                raise
    raise TimeoutError(f"no {kind} in {10 * REPLAY_WAIT_S:g} s")


async def call(url: str, scenario: Scenario, run_dir: Path, tail_s: float = 1.5) -> None:
    """Play the script into a call as a client would; record both sides on the client's clock.

    The user track is what the client sent (each utterance at the loop time its
    first sample went out); the agent track is what arrived, frame k placed at
    the median of (arrival - k * 20 ms), so jitter does not smear it.
    """
    from web.client import RtcClient

    client = RtcClient(url)
    await client.connect()
    loop = asyncio.get_running_loop()
    t0, sent, mark = loop.time(), [], 0
    try:
        for part in scenario.parts:
            if part.trigger == "previous":
                at = (await sent[-1][1].ended) if sent else t0
            else:
                kind = "agent_speech_start" if part.trigger == "agent_start" else "agent_speech_end"
                try:
                    await wait_for_agent(client, kind, mark)
                except TimeoutError:
                    break
                mark = len(client.events)
                at = loop.time()
            await asyncio.sleep(max(0.0, at + part.delay - loop.time()))
            sent.append((part, client.say(part.audio)))
            mark = max(mark, len(client.events))
        if sent:
            await sent[-1][1].ended
        script_end = quiet_since = loop.time()
        while loop.time() - quiet_since < tail_s and loop.time() - script_end < REPLAY_WAIT_S:
            await asyncio.sleep(0.1)
            recent = [rms for _, rms in client.heard.arrivals[-10:]]
            if not idle(client.events) or not recent or max(recent) > 0.003:
                quiet_since = loop.time()
    finally:
        await client.close()
    agent = client.heard.samples()
    frame = SAMPLE_RATE // 50
    origin = float(np.median([at - k * 0.02 for k, (at, _) in enumerate(client.heard.arrivals)])) - 0.02
    starts = [(await u.started) - origin for _, u in sent]
    n = max(len(agent), int(max([s + p.duration for (p, _), s in zip(sent, starts)] + [0]) * SAMPLE_RATE)) + frame
    user = np.zeros(n, np.float32)
    for (part, _), s in zip(sent, starts):
        i = max(0, int(round(s * SAMPLE_RATE)))
        user[i:i + len(part.audio)] = part.audio[:max(0, n - i)]
    track = np.zeros(n, np.float32)
    track[:len(agent)] = agent
    run_dir.mkdir(parents=True, exist_ok=True)
    write_wav(run_dir / "conversation.wav", np.stack([user, track], axis=1), SAMPLE_RATE)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in client.events))
    (run_dir / "summary.json").write_text(json.dumps({"user_utterance_starts": [round(s, 3) for s in starts],
                                                      "transport": "webrtc"}, indent=2))


def call_in_process(url: str, scenario: Scenario, run_dir: Path) -> None:
    """``call`` from a process of the caller's own (see run_all)."""
    asyncio.run(call(url, scenario, run_dir))


# -- the whole benchmark ---------------------------------------------------------------------------

def aggregate(out: Path, machine: str, config: Config, transport: str, scenarios: list[Scenario]) -> dict:
    by_cat: dict[str, list] = {c: [] for c in CATEGORIES}
    skipped: dict[str, int] = {c: 0 for c in CATEGORIES}
    delays = []  # turntaking: the engine's end-of-turn decision after the last word, s
    bc_stops = []  # backchannel: the engine stopped its voice after the backchannel
    for s in scenarios:
        path = out / s.category / s.id / "score.json"
        if not path.exists():
            continue
        scored = json.loads(path.read_text())
        if scored.get("turn_end_decision_s") is not None:
            delays.append(scored["turn_end_decision_s"])
        if scored.get("engine_stopped") is not None and scored["result"] and scored["result"]["valid"]:
            bc_stops.append(scored["engine_stopped"])
        r = scored["result"]
        if r is None:
            skipped[s.category] += 1
        else:
            by_cat[s.category].append(score.from_dict(s.category, r))
    metrics = {c: {**score.summarize(c, rs), "n_not_played": skipped[c]} for c, rs in by_cat.items()
               if rs or skipped[c]}
    if delays and "turntaking" in metrics:
        chunk_s = config.chunk_ms / 1000
        metrics["turntaking"]["decision_p50_chunks"] = round(float(np.median(delays)) / chunk_s, 2)
    if bc_stops and "backchannel" in metrics:
        metrics["backchannel"]["engine_stop_rate"] = round(sum(bc_stops) / len(bc_stops), 3)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"machine": machine, "transport": transport, "date": date,
            "config": {k: str(v) for k, v in asdict(config).items() if k != "system_prompt"},
            "scenarios_planned": {c: sum(s.category == c for s in scenarios) for c in CATEGORIES},
            "metrics": metrics}


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(results: dict) -> str:
    m = results["metrics"]
    lines = [f"# bench duplex ({results['transport']})", "",
             f"{results['machine']}; {results['date']}; Whisper {results['config']['asr_model']}, "
             f"LLM {results['config']['llm']}, chunk {results['config']['chunk_ms']} ms.", "",
             "| category | metric | ours | n | Freeze-Omni | Moshi | best published | target |",
             "|---|---|---|---|---|---|---|---|"]
    for cat, key, label, target in ROWS:
        if cat not in m:
            continue
        pub = PUBLISHED.get((cat, key), (None, None, None))
        n = m[cat].get("n_valid", m[cat]["n"])
        lines.append(f"| {cat} | {label} | {fmt(m[cat].get(key))} | {n} | "
                     + " | ".join(fmt(p) for p in pub) + f" | {target or '-'} |")
    lines += ["", "Published figures: Full-Duplex-Bench v1 (Lin et al., 2025), synthetic sets; "
              "its latencies are means. "
              "n: scenarios scored (backchannel, interruption: those where the agent was still speaking when the "
              "user spoke)."]
    return "\n".join(lines) + "\n"


def run_all(engine, scenarios: list[Scenario], out: Path, machine: str, transport: str = "replay",
            resume: bool = False) -> dict:
    """Run, score and report ``scenarios`` on a loaded engine; results are rewritten after each one."""
    out = Path(out)
    server = caller = None
    # Scoring runs Whisper and silero on the model thread, idle between scenarios (on
    # this thread they would start a second OpenMP team: agent.engine.light_torch_thread).
    on_models = lambda fn, *a: engine.model_executor.submit(fn, *a).result()  # noqa: E731
    vad = on_models(score.SileroVad)
    report = lambda: write_results(out, aggregate(out, machine, engine.config, transport, scenarios))  # noqa: E731
    try:
        if transport == "webrtc":
            from web.server import ServerSettings, ServerThread, create_app

            server = ServerThread(create_app(ServerSettings(max_sessions=1), engine=engine))
            # The caller is a process of its own, as a real caller is: in this one its
            # event loop would share the interpreter lock with the server's and the models'.
            caller = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        for k, s in enumerate(scenarios):
            run_dir = out / s.category / s.id
            if resume and (run_dir / "score.json").exists():
                continue
            t1 = time.monotonic()
            if caller:
                caller.submit(call_in_process, server.url, s, run_dir).result()
            else:
                run_replay(engine, s, run_dir)
            (run_dir / "scenario.json").write_text(json.dumps(s.describe(), indent=2))
            scored = on_models(score_run, s, run_dir, vad, engine.asr)
            (run_dir / "score.json").write_text(json.dumps(scored, indent=2))
            print(f"[{k + 1}/{len(scenarios)}] {s.id}: {scored['result']} ({time.monotonic() - t1:.0f} s)", flush=True)
            report()  # a run cut short still leaves its results
    finally:
        if caller:
            caller.shutdown(cancel_futures=True)
        if server:
            server.stop()
    return report()


def run(args: argparse.Namespace, config: Config, machine: str) -> dict:
    from agent.engine import Engine

    categories = tuple(args.categories.split(",")) if args.categories else CATEGORIES
    t0 = time.monotonic()
    scenarios = generate(args.per_category, Speaker(config.cache_dir), categories, args.seed)
    print(f"{len(scenarios)} scenarios generated in {time.monotonic() - t0:.0f} s", flush=True)
    engine = Engine.load(config)
    try:
        return run_all(engine, scenarios, Path(args.out), machine, args.transport, args.resume)
    finally:
        engine.close()


def write_results(out: Path, results: dict) -> dict:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def main(args: argparse.Namespace, config: Config, machine: str) -> int:
    print(f"bench duplex on {machine}; transport {args.transport}, {args.per_category} per category", flush=True)
    results = run(args, config, machine)
    print(markdown(results))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/bench-duplex", help="folder for the runs, results.json, results.md")
    parser.add_argument("--transport", choices=("replay", "webrtc"), default="replay")
    parser.add_argument("--per-category", type=int, default=30, 
                        help="scenarios per category (30 or more for a full run)")
    parser.add_argument("--categories", help=f"comma-separated subset of {','.join(CATEGORIES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenario generator")
    parser.add_argument("--resume", action="store_true", help="keep scenarios already scored in --out")
