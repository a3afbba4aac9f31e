"""Helpers of the browser-server tests (state read from the server thread, process numbers)."""
from __future__ import annotations

import gc
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx


def sessions(server) -> int:
    return httpx.get(server.url + "health", timeout=10).json()["sessions"]


def wait_until(condition, timeout: float, what: str) -> None:
    """For state that lives in the server's thread: check every 20 ms until true or the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


def process_numbers() -> tuple[int, float]:
    """(threads, resident MB) of this process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines())
    return int(status["Threads"]), int(status["VmRSS"].split()[0]) / 1024


def thread_census() -> tuple[Counter, int]:
    """(this process's Python threads by kind, the number of its native threads).

    A thread of an executor pool ("asyncio_3", "duplex-tts_1") counts under its
    pool ("asyncio_*"): pools start threads as they need them, up to their bound.
    Native threads are the libraries' own (OpenMP, MKL, onnxruntime, and two
    for each of PyAV's codec contexts). The garbage is collected first: aiortc's
    codecs sit in reference cycles, and their threads end when the collector
    frees them (on the AVX2 EPYC, 50 calls left 2-16 such threads uncollected,
    and none after a collection).
    """
    gc.collect()
    python = threading.enumerate()
    kinds = Counter(re.sub(r"_\d+$", "_*", t.name) for t in python)
    ids = {t.native_id for t in python}
    return kinds, sum(int(tid) not in ids for tid in os.listdir(f"/proc/{os.getpid()}/task"))
