"""``run_agent.py bench asr``: streaming Whisper against offline Whisper, and what
the incremental LLM prefill leaves for the end of the turn.

On synthesized utterances (bench/data/asr_utterances.txt, voices in turn from
Piper, flite and espeak-ng, see bench/corpus.py) it measures:

- WER of offline Whisper (openai-whisper's transcribe: 30 s padded encoder, the
  agent's WhisperASR), of one greedy pass with the window encoder (first N
  positional embeddings, no pad) and with the padded encoder through the same
  decoder (this isolates the positional-embedding decision), and of the
  streaming path (speech_encoder.streaming, chunk by chunk);
- per-chunk compute of the streaming path (p50/p95 per utterance-length bucket);
- end of speech -> final words: the silence heard by the first step after the
  speech, plus that step (audio handed over as the session does: by chunks, and
  with ``io_ms`` under a chunk, at the frame where the end step is due); and
  ``finish()`` after the endpointer's silence has been pushed;
- LLM prefill left at the end of the turn, with and without the incremental
  adapter (speech_encoder.adapter), with the real chat model.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

from agent.config import SAMPLE_RATE, Config
from bench import machine

BUCKETS = ((0, 3), (3, 6), (6, 10), (10, 15), (15, 20), (20, 1e9))


# -- word error rate ---------------------------------------------------------------------------

def normalizer(language: str):
    """Whisper's own normalizers (English: numbers to digits, fillers and
    punctuation dropped, British spellings), then adjacent digit groups joined:
    "seven thirty" normalizes to "730", so "7:30", "7.30" and "7 30" must too,
    and "555-1234" reads as "five five five, one two three four"."""
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    base = EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()

    def norm(text: str) -> list[str]:
        s = base(text)
        words = re.sub(r"[^\w\s]", " ", s).split()
        out: list[str] = []
        for w in words:
            if out and w.isdigit() and out[-1].isdigit():
                out[-1] += w
            else:
                out.append(w)
        return out

    return norm


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(refs: list[str], hyps: list[str], language: str = "en") -> float:
    norm = normalizer(language)
    errors = words = 0
    for r, h in zip(refs, hyps):
        rw = norm(r)
        errors += edit_distance(rw, norm(h))
        words += len(rw)
    return errors / max(1, words)


def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


# -- the runs ----------------------------------------------------------------------------------

def stream_utterance(st, audio: np.ndarray, chunk: int, tail_silence_s: float, endpointer=None):
    """Push ``audio`` and ``tail_silence_s`` of silence chunk by chunk, then finish.

    With an ``endpointer`` (speech_encoder.vad.Endpointer, as the session's), as a
    session that steps by 20 ms frames: the chunk in which the speech has fallen
    silent for the transcriber's end step is handed over in pieces, at that frame
    (agent/session.py, ``_words_just_ended``), at the frame before it, after which
    the end step is taken ahead (``_words_just_ended(n, ahead=True)``; if the
    options say so), and at the chunk's end. Returns (hypotheses, one per push;
    compute ms per chunk; CPU ms per chunk; the final hypothesis; finish wall
    time ms)."""
    from speech_encoder.vad import VAD_FRAME_MS

    st.reset()
    x = np.concatenate([audio, np.zeros(int(tail_silence_s * SAMPLE_RATE), np.float32)])
    x = np.concatenate([x, np.zeros(-len(x) % chunk, np.float32)])
    frame = SAMPLE_RATE * VAD_FRAME_MS // 1000
    end = st.options.end_step_ms
    hyps, chunk_ms, chunk_cpu = [], [], []
    for i in range(0, len(x), chunk):
        cuts, ahead_at = [0, chunk], None
        if endpointer is not None:
            for j in range(0, chunk, frame):
                endpointer.process(x[i + j:i + j + frame], (i + j) / SAMPLE_RATE)
                if not endpointer.in_speech:
                    continue
                at = j + frame
                if endpointer.silence_ms == end - VAD_FRAME_MS and st.options.step_ahead:
                    ahead_at = at
                if endpointer.silence_ms == end or at == ahead_at:
                    cuts += [at] if at < chunk else []
        cuts.sort()
        wall = cpu = 0.0
        for a, b in zip(cuts, cuts[1:]):
            h = st.push(x[i + a:i + b])
            hyps.append(h)
            wall, cpu = wall + h.compute_ms, cpu + h.cpu_ms
            if b == ahead_at:
                t0 = time.perf_counter(), time.thread_time()
                st.step_ahead()
                wall += (time.perf_counter() - t0[0]) * 1000
                cpu += (time.thread_time() - t0[1]) * 1000
        chunk_ms.append(wall)
        chunk_cpu.append(cpu)
    t0 = time.perf_counter()
    final = st.finish()
    return hyps, chunk_ms, chunk_cpu, final, (time.perf_counter() - t0) * 1000


def end_to_final_ms(hyps, fallback_ms: float) -> float:
    """The first step after the last voiced push: the silence it had heard plus its
    compute (``fallback_ms`` when no step came before ``finish``). A step taken a
    frame ahead began a frame sooner, when that frame's silence had been heard:
    its words are known when it is done or when the frame it assumed comes, the
    later of the two, plus the push that adopts it (audio comes in real time)."""
    from speech_encoder.vad import VAD_FRAME_MS

    last_voiced = max((i for i, h in enumerate(hyps) if h.silence_ms == 0 and h.audio_s), default=-1)
    after = [h for h in hyps[last_voiced + 1:] if h.encoder_frames]
    if not after:
        return fallback_ms
    h = after[0]
    if h.ahead_ms:
        return h.silence_ms - VAD_FRAME_MS + max(VAD_FRAME_MS, h.ahead_ms) + h.compute_ms
    return h.silence_ms + h.compute_ms


def prefill_costs(llm, system_prompt: str, hyps, final_text: str, int8: bool = False) -> dict:
    """End-of-turn prefill with the adapter fed chunk by chunk, and without (the
    whole user message prefilled once the turn has ended)."""
    from agent.llm import PrefixCache
    from speech_encoder.adapter import TextAdapter
    from speech_encoder.streaming import StreamingOptions

    messages = [{"role": "system", "content": system_prompt}]
    base = PrefixCache()
    llm.extend(base, llm.prompt_ids(messages))
    cache = base.copy()  # the adapter's run starts from the same system prompt, not a second prefill
    full = llm.prompt_ids(messages + [{"role": "user", "content": final_text}])
    t0 = time.perf_counter()
    without_tokens = llm.extend(base, full)
    without_ms = (time.perf_counter() - t0) * 1000

    adapter = TextAdapter(llm, cache, end_guess_ms=StreamingOptions().end_step_ms, int8=int8)  # as agent/turn.py
    adapter.begin(messages)
    during = [adapter.update(h) for h in hyps]
    end = adapter.finalize(final_text)
    assert cache.ids == full, "the adapter's prompt differs from the template's"
    return {"without_tokens": without_tokens, "without_ms": without_ms,
            "with_tokens": end.tokens, "with_ms": end.ms,
            "during_tokens": sum(p.tokens for p in during), "during_ms": sum(p.ms for p in during),
            "update_ms": [p.ms for p in during if p.tokens]}


def chunk_buckets(rows: list[dict], sfx: str = "") -> dict:
    """Per-chunk compute p50/p95 (wall and CPU time) by utterance length."""
    out = {}
    for lo, hi in BUCKETS:
        sub = [r for r in rows if lo <= r["seconds"] < hi]
        if not sub:
            continue
        all_ms = [m for r in sub for m in r["chunk_ms" + sfx]]
        cpu = [m for r in sub for m in r["chunk_cpu_ms" + sfx]]
        out[f"{lo}-{hi if hi < 1e9 else 'inf'} s"] = {
            "utterances": len(sub), "chunks": len(all_ms), "p50": pct(all_ms, 50), "p95": pct(all_ms, 95),
            "cpu_p50": pct(cpu, 50), "cpu_p95": pct(cpu, 95)}
    return out


def run(config: Config, out_path: Path | None = None, limit: int | None = None,
        adapter_limit: int = 40, nopad_limit: int = 30, verbose: bool = True, compare_int8: bool = False,
        compare_step_ahead: bool = False, compare_window: tuple[float, float] | None = None,
        compare_revise: bool = False) -> dict:
    """The whole benchmark; returns (and with ``out_path`` writes as JSON) its figures.
    ``compare_int8``: stream every utterance with the float32 and the int8 model
    (speech_encoder.asr.quantize_int8), side by side; ``compare_step_ahead``: with
    the end step taken a frame ahead and without (figures ``_no_ahead``);
    ``compare_window`` (max, hard): also with the encoder window cut once longer
    than max seconds, everything committed past hard (figures ``_window``);
    ``compare_revise``: also with an end step that may not revise committed words
    (figures ``_no_revise``)."""
    import torch

    from agent import models
    from bench.corpus import asr_test_set
    from speech_encoder.asr import WhisperASR
    from speech_encoder.streaming import StreamingOptions, StreamingTranscriber
    from speech_encoder.vad import Endpointer

    say = print if verbose else (lambda *a, **k: None)
    say(f"machine: {machine()}")
    path = models.ensure(config.cache_dir, f"whisper-{config.asr_model}")
    # Offline Whisper is openai-whisper's float32 model whatever the streaming path runs.
    asr = WhisperASR(path / "model.pt", config.language, threads=1)
    st = StreamingTranscriber.from_asr(asr, StreamingOptions(), model_name=config.asr_model)
    streams = {} if config.asr_int8 and not compare_int8 else {"": st}  # suffix of the figures -> transcriber
    if config.asr_int8 or compare_int8:
        asr8 = WhisperASR(path / "model.pt", config.language, threads=1, int8=True)
        streams["_int8" if compare_int8 else ""] = StreamingTranscriber.from_asr(asr8, StreamingOptions(),
                                                                                 model_name=config.asr_model)
    # Variants streamed beside the default, on its model: figures' suffix -> options.
    variants = {"_no_ahead": compare_step_ahead and StreamingOptions(step_ahead=False),
                "_no_revise": compare_revise and StreamingOptions(revise_at_end=False),
                "_window": compare_window and StreamingOptions(max_window_s=compare_window[0],
                                                               hard_window_s=compare_window[1])}
    for sfx, options in variants.items():
        if options:
            streams[sfx] = StreamingTranscriber(streams[""].model, config.language, options, model_name=config.asr_model)
    t0 = time.monotonic()
    utts = asr_test_set(config.cache_dir, limit)
    say(f"{len(utts)} utterances synthesized in {time.monotonic() - t0:.0f} s "
        f"({sum(u.seconds for u in utts) / 60:.1f} min of speech); chunk {config.chunk_ms} ms, "
        f"Whisper {config.asr_model}, 1 torch thread")

    chunk = config.chunk_samples
    tail_s = config.endpoint_silence_ms / 1000
    rows = []
    for n, u in enumerate(utts):
        torch.set_num_threads(1)
        t = time.perf_counter()
        offline = asr.transcribe(u.audio).text
        offline_ms = (time.perf_counter() - t) * 1000
        window = st.transcribe_whole(u.audio, pad=False)
        padded = st.transcribe_whole(u.audio, pad=True)
        # No padding at all loops (measured 93% WER), slowly: only on the first utterances.
        unpadded = st.transcribe_whole(u.audio, pad_frames=0) if n < nopad_limit else None
        row = {"id": u.id, "voice": u.voice, "seconds": u.seconds, "ref": u.text,
               "offline": offline, "offline_ms": offline_ms, "window": window, "padded": padded,
               "unpadded": unpadded}
        for sfx, stream in streams.items():
            ep = Endpointer(config.vad_aggressiveness, config.speech_start_ms, config.endpoint_silence_ms)
            hyps, chunk_ms, chunk_cpu, final, finish_ms = stream_utterance(
                stream, u.audio, chunk, tail_s, ep if config.io_ms < config.chunk_ms else None)
            # The session learns the words when the first step after the speech stopped
            # returns: the silence heard by then plus that step's compute.
            row.update({"streaming" + sfx: final.committed, "finish_ms" + sfx: finish_ms,
                        "end_to_final_ms" + sfx: end_to_final_ms(hyps, tail_s * 1000 + finish_ms),
                        "chunk_ms" + sfx: chunk_ms, "chunk_cpu_ms" + sfx: chunk_cpu,
                        "steps" + sfx: sum(h.encoder_frames > 0 for h in hyps),
                        "max_encoder_frames" + sfx: max([h.encoder_frames for h in hyps] + [0]),
                        "committed_changes" + sfx: sum(1 for a, b in zip(hyps, hyps[1:]) if a.committed != b.committed),
                        "_hyps" + sfx: hyps})
        rows.append(row)
        if verbose and (n % 10 == 0 or n == len(utts) - 1):
            say(f"  [{n + 1}/{len(utts)}] {u.voice:12} {u.seconds:4.1f} s  ref: {u.text[:60]}\n"
                f"      offline: {offline[:60]}\n      stream:  {row['streaming'][:60]}")

    refs = [r["ref"] for r in rows]
    lang = config.language if config.language not in ("auto", "") else "en"
    kinds = ("offline", "padded", "window") + tuple("streaming" + sfx for sfx in streams)
    result = {"machine": machine(), "utterances": len(rows), "chunk_ms": config.chunk_ms, "io_ms": config.io_ms,
              "asr_model": config.asr_model, "streaming_int8": bool(config.asr_int8 and not compare_int8),
              "window_s": [ws.options.max_window_s, ws.options.hard_window_s] if (ws := streams.get("_window")) else None,
              "wer": {k: wer(refs, [r[k] for r in rows], lang) for k in kinds},
              "wer_by_voice": {}, "offline_ms_p50": pct([r["offline_ms"] for r in rows], 50)}
    for sfx in streams:
        result.update({
            "per_chunk_ms" + sfx: chunk_buckets(rows, sfx),
            "finish_ms_p50" + sfx: pct([r["finish_ms" + sfx] for r in rows], 50),
            "finish_ms_p95" + sfx: pct([r["finish_ms" + sfx] for r in rows], 95),
            "end_to_final_ms_p50" + sfx: pct([r["end_to_final_ms" + sfx] for r in rows], 50),
            "end_to_final_ms_p90" + sfx: pct([r["end_to_final_ms" + sfx] for r in rows], 90),
            "max_encoder_frames" + sfx: max(r["max_encoder_frames" + sfx] for r in rows),
            "steps_per_s" + sfx: sum(r["steps" + sfx] for r in rows)
            / sum(len(r["chunk_ms" + sfx]) * config.chunk_ms / 1000 for r in rows),
            "rtf" + sfx: sum(sum(r["chunk_ms" + sfx]) for r in rows)
            / sum(len(r["chunk_ms" + sfx]) * config.chunk_ms for r in rows)})
    sub = [r for r in rows if r["unpadded"] is not None]
    result["wer_unpadded"] = {"utterances": len(sub), "unpadded": wer([r["ref"] for r in sub], [r["unpadded"] for r in sub], lang),
                              "window": wer([r["ref"] for r in sub], [r["window"] for r in sub], lang),
                              "padded": wer([r["ref"] for r in sub], [r["padded"] for r in sub], lang)}
    for voice in sorted({r["voice"] for r in rows}):
        sub = [r for r in rows if r["voice"] == voice]
        result["wer_by_voice"][voice] = {k: wer([r["ref"] for r in sub], [r[k] for r in sub], lang)
                                         for k in ("offline",) + tuple("streaming" + sfx for sfx in streams)}

    if adapter_limit and config.llm:
        from agent.llm import ChatLLM

        llm = ChatLLM(models.ensure(config.cache_dir, config.llm), threads=config.torch_threads, dtype=config.llm_dtype)
        costs = []
        for r in rows[:adapter_limit]:
            if r["streaming"]:
                costs.append(prefill_costs(llm, config.system_prompt, r["_hyps"], r["streaming"], config.listen_int8))
        result["prefill"] = {
            "llm": config.llm, "utterances": len(costs),
            "without_tokens_p50": pct([c["without_tokens"] for c in costs], 50),
            "without_ms_p50": pct([c["without_ms"] for c in costs], 50),
            "with_tokens_p50": pct([c["with_tokens"] for c in costs], 50),
            "with_tokens_p95": pct([c["with_tokens"] for c in costs], 95),
            "with_ms_p50": pct([c["with_ms"] for c in costs], 50),
            "with_ms_p95": pct([c["with_ms"] for c in costs], 95),
            "update_ms_p50": pct([m for c in costs for m in c["update_ms"]], 50),
            "update_ms_p95": pct([m for c in costs for m in c["update_ms"]], 95),
            "during_tokens_mean": statistics.fmean([c["during_tokens"] for c in costs]) if costs else 0.0,
        }
    for r in rows:
        for sfx in streams:
            del r["_hyps" + sfx]
    result["rows"] = rows
    report(result, say)
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1))
    return result


def report(res: dict, say=print) -> None:
    w = res["wer"]
    say(f"\nASR benchmark: {res['utterances']} utterances, Whisper {res['asr_model']}, chunk {res['chunk_ms']} ms"
        f", audio handed over by {res.get('io_ms', res['chunk_ms'])} ms")
    say(f"machine: {res['machine']}")
    say(f"WER  offline (openai-whisper transcribe, 30 s pad): {w['offline']:.1%}")
    say(f"     one pass, padded encoder:                    {w['padded']:.1%}")
    say(f"     one pass, window encoder (first N positions, 1 s pad): {w['window']:.1%}")
    u = res["wer_unpadded"]
    say(f"     first {u['utterances']} utterances: window without pad {u['unpadded']:.1%}, "
        f"with 1 s pad {u['window']:.1%}, padded to 30 s {u['padded']:.1%}")
    sfxs = [k[len("streaming"):] for k in w if k.startswith("streaming")]
    for sfx in sfxs:
        name = "streaming, int8 model" if sfx == "_int8" or res.get("streaming_int8") else "streaming"
        name += ", end step not ahead" if sfx == "_no_ahead" else ""
        name += ", end step revises nothing" if sfx == "_no_revise" else ""
        name += f", window {res['window_s'][0]:g} / {res['window_s'][1]:g} s" if sfx == "_window" else ""
        say(f"     {name + ':':45}{w['streaming' + sfx]:.1%}"
            f"  ({w['streaming' + sfx] / max(w['offline'], 1e-9):.2f}x offline)")
    for voice, v in res["wer_by_voice"].items():
        say(f"     {voice:14} offline {v['offline']:.1%}  "
            + "  ".join(f"streaming{sfx} {v['streaming' + sfx]:.1%}" for sfx in sfxs))
    for sfx in sfxs:
        say(f"streaming{sfx}: per-chunk compute (half a chunk = {res['chunk_ms'] / 2:.0f} ms):")
        for bucket, b in res["per_chunk_ms" + sfx].items():
            say(f"     {bucket:9} {b['utterances']:3} utt {b['chunks']:5} chunks  wall p50 {b['p50']:6.1f} p95 {b['p95']:6.1f} ms"
                f"  cpu p50 {b['cpu_p50']:6.1f} p95 {b['cpu_p95']:6.1f} ms")
        say(f"     steps per second of audio {res['steps_per_s' + sfx]:.1f}; compute / audio time {res['rtf' + sfx]:.2f}")
        say(f"     end of speech -> final words known (silence heard + the end step): p50 "
            f"{res['end_to_final_ms_p50' + sfx]:.0f} ms, p90 {res['end_to_final_ms_p90' + sfx]:.0f} ms")
        say(f"     finish() once the endpointer's silence was pushed: p50 {res['finish_ms_p50' + sfx]:.1f} ms, p95 "
            f"{res['finish_ms_p95' + sfx]:.1f} ms  (offline transcribe p50 {res['offline_ms_p50']:.0f} ms)")
        say(f"     most encoder positions in one step: {res['max_encoder_frames' + sfx]}")
    p = res.get("prefill")
    if p:
        say(f"prefill left at end of turn ({p['llm']}, {p['utterances']} utterances):")
        say(f"     without adapter: p50 {p['without_tokens_p50']:.0f} tokens, {p['without_ms_p50']:.0f} ms")
        say(f"     with adapter:    p50 {p['with_tokens_p50']:.0f} tokens, {p['with_ms_p50']:.1f} ms "
            f"(p95 {p['with_tokens_p95']:.0f} tokens, {p['with_ms_p95']:.1f} ms)")
        say(f"     adapter updates during the turn: p50 {p['update_ms_p50']:.0f} ms, p95 {p['update_ms_p95']:.0f} ms, "
            f"{p['during_tokens_mean']:.0f} tokens per turn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    parser.add_argument("--adapter-limit", type=int, default=40, help="utterances for the prefill measurement (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--compare-int8", action="store_true",
                        help="stream each utterance with the float32 and the int8 Whisper, side by side")
    parser.add_argument("--compare-step-ahead", action="store_true",
                        help="stream each utterance with the end step taken a frame ahead and without, side by side")
    parser.add_argument("--compare-revise", action="store_true",
                        help="stream each utterance with an end step that may revise committed words and "
                             "with one that may not, side by side")
    parser.add_argument("--compare-window", type=_window_pair, default=None, metavar="MAX,HARD",
                        help="also stream each utterance with the encoder window cut past MAX s (everything "
                             "committed past HARD s), side by side with the default window")


def _window_pair(text: str) -> tuple[float, float]:
    try:
        max_s, hard_s = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAX,HARD in seconds, e.g. 5,8; got {text!r}") from None
    if not 1.0 < max_s <= hard_s <= 28.0:
        raise argparse.ArgumentTypeError(f"need 1 < MAX <= HARD <= 28 s, got {text!r}")
    return max_s, hard_s


def main(args: argparse.Namespace, config: Config, machine_name: str) -> int:
    """``run_agent.py bench asr`` (the engine flags are added by run_agent.py)."""
    run(config, args.out, args.limit, args.adapter_limit, compare_int8=args.compare_int8,
        compare_step_ahead=args.compare_step_ahead, compare_window=args.compare_window,
        compare_revise=args.compare_revise)
    return 0
