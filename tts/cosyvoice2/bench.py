"""First-chunk latency and real-time factor of a TTS backend.

``bench_tts(backend, texts, repeats)`` streams each text (as one piece) ``repeats`` times
and reports, over all runs: first-chunk latency (time from the call to the first audio
piece), total synthesis time, audio seconds, and RTF = synthesis time / audio time.
Texts may be strings (``backend.stream``) or lists of token ids, for backends without a
tokenizer that offer ``stream_ids`` (the tiny conformance model).
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Sequence


def bench_tts(backend, texts: Sequence, repeats: int = 3) -> dict:
    first, rtf, total_s, audio_s = [], [], 0.0, 0.0
    for _ in range(repeats):
        for text in texts:
            cancel = threading.Event()
            if isinstance(text, str):
                it = backend.stream([text], cancel)
            else:
                it = backend.stream_ids([list(text)], cancel)
            t0 = time.perf_counter()
            t_first, n = None, 0
            for piece in it:
                if t_first is None:
                    t_first = time.perf_counter() - t0
                n += len(piece.audio)
            dt = time.perf_counter() - t0
            secs = n / backend.sample_rate
            first.append(t_first if t_first is not None else dt)
            rtf.append(dt / secs if secs else float("inf"))
            total_s += dt
            audio_s += secs

    def stats(xs: list) -> dict:
        xs = sorted(xs)
        return {"mean": statistics.fmean(xs), "median": statistics.median(xs),
                "min": xs[0], "max": xs[-1]}

    return {"backend": getattr(backend, "name", type(backend).__name__), "runs": len(first),
            "first_chunk_s": stats(first), "rtf": stats(rtf),
            "total_synthesis_s": total_s, "total_audio_s": audio_s,
            "overall_rtf": total_s / audio_s if audio_s else float("inf")}
