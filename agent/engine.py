"""The models of one process, loaded once and shared by every session.

Torch models (Whisper, the LLM) are loaded and run on one worker thread so they
never compete for the cores with each other; the voice runs on its own
worker(s). The event loop only hands work to these executors and takes results
back; the little torch it computes itself (the state heads' MLP) it computes on
one thread (``light_torch_thread``).
"""
from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

from agent import models
from agent.config import Config
from agent.llm import ChatLLM, PrefixCache
from speech_encoder.asr import WhisperASR
from tts.base import TTSBackend

log = logging.getLogger(__name__)


def light_torch_thread() -> None:
    """This thread runs only small torch work: one torch thread, so it never
    starts an OpenMP team of its own. libgomp gives every thread that runs a
    parallel op its own team of workers, and once there are more workers than
    cores, all of them stop spinning between ops. Measured on the 2-core Xeon:
    once the event loop's state head had run its MLP with 2 threads, the LLM's
    decoding on the model thread took 70 ms a token instead of 50 for the rest
    of the process (a thread that ran torch and ended leaves no such cost)."""
    import torch

    # torch sets a thread up on its first use, to the count set last on any thread:
    # done first, that setup cannot later undo ours (the event loop's head then ran
    # on the model thread's 2).
    torch.get_num_threads()
    torch.set_num_threads(1)


class ModelWorker:
    """The one thread that runs the torch models, with a fast lane.

    A reply's generation holds the thread for seconds, token by token. Work that
    must not wait that long (per-chunk listening while the agent talks) goes in
    through ``run_urgent``: it runs at once if the thread is idle, or at the
    generation's next ``yield_point`` (between two tokens) if not.
    """

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="duplex-model")
        self._urgent: queue.SimpleQueue = queue.SimpleQueue()

    def run_urgent(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._urgent.put((fut, partial(fn, *args)))
        self.executor.submit(self.yield_point)
        return fut

    def yield_point(self) -> None:
        """Run the urgent jobs waiting now. Call only from the model thread."""
        while True:
            try:
                fut, job = self._urgent.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(job())
                except BaseException as e:  # handed to the waiting side, not lost
                    fut.set_exception(e)


@dataclass
class LoadTimes:
    provision_s: float
    asr_s: float
    llm_s: float
    tts_s: float


def load_tts(config: Config, piper_dir=None) -> TTSBackend:
    """The configured voice: Piper from the cache, or CosyVoice 2 from the user's folder."""
    if config.tts == "cosyvoice2":
        from tts.cosyvoice2 import CosyVoice2TTS

        return CosyVoice2TTS(config.tts_model_dir, speaker=config.tts_speaker or None)
    from tts.piper import PiperTTS

    return PiperTTS(piper_dir, config.tts_threads, config.tts_first_threads)


def load_head(config: Config):
    """The shipped state head for the configured LLM; None when off or missing (said in the log)."""
    if not config.state_heads:
        return None
    from agent.heads import StateHead

    try:
        return StateHead.load(config.llm)
    except (FileNotFoundError, ValueError) as e:
        log.warning("state heads off: %s", e)
        return None


class Engine:
    def __init__(self, config: Config, asr: WhisperASR, llm: ChatLLM, tts: TTSBackend, head=None,
                 model_worker: ModelWorker | None = None):
        self.config = config
        self.head = head  # agent.heads.StateHead for this LLM, or None: the duration rule decides
        self.asr = asr
        self.llm = llm
        self.tts = tts
        self.model_worker = model_worker or ModelWorker()
        self.model_executor = self.model_worker.executor
        self._borrowed_worker = False  # another engine's model thread (``sharing``): it closes it
        self.tts_executor = ThreadPoolExecutor(2, thread_name_prefix="duplex-tts")
        self.load_times: LoadTimes | None = None
        self._prefixes: dict[str, PrefixCache] = {}  # system prompt -> its prefilled cache; model thread only

    def system_prefix(self, system_prompt: str, into: PrefixCache | None = None) -> PrefixCache:
        """Model thread: a session's own copy of the cache of ``system_prompt`` (in ``into``).

        The prompt is prefilled once per process (about 1.5 s for the default one on
        2 cores) and copied for each session (a few ms): a new call's first words
        no longer wait behind that prefill on the model thread.
        """
        shared = self._prefixes.get(system_prompt)
        if shared is None:
            shared = PrefixCache()
            self.llm.extend(shared, self.llm.prompt_ids([{"role": "system", "content": system_prompt}]))
            if len(self._prefixes) >= 8:  # sessions with their own prompts: keep the memory bounded
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[system_prompt] = shared
        return shared.copy(into)

    @classmethod
    def load(cls, config: Config, provision: bool = True) -> "Engine":
        """Provision (if allowed) and load the configured models; blocks for seconds."""
        t0 = time.monotonic()
        get = models.ensure if provision else models.require
        names = models.names_for(config.asr_model, config.llm, config.tts)
        paths = {n: get(config.cache_dir, n) for n in names}
        t1 = time.monotonic()

        def load_torch() -> tuple:  # on the thread that will run them (light_torch_thread says why)
            asr = WhisperASR(paths[names[0]] / "model.pt", config.language, config.torch_threads,
                             int8=config.asr_int8)
            t2 = time.monotonic()
            llm = ChatLLM(paths[names[1]], config.torch_threads, config.llm_dtype)
            return asr, t2, llm, time.monotonic(), load_head(config)

        worker = ModelWorker()
        try:
            asr, t2, llm, t3, head = worker.executor.submit(load_torch).result()
        except BaseException:
            worker.executor.shutdown(wait=False)
            raise
        tts = load_tts(config, paths.get("piper-joe"))
        t4 = time.monotonic()
        engine = cls(config, asr, llm, tts, head, worker)
        # The configured system prompt is prefilled now, not by the first call (counted as the LLM's).
        engine.model_executor.submit(engine.system_prefix, config.system_prompt).result()
        engine.load_times = LoadTimes(t1 - t0, t2 - t1, t3 - t2 + time.monotonic() - t4, t4 - t3)
        log.info("models ready: %s", engine.load_times)
        return engine

    def sharing(self, **parts) -> "Engine":
        """An engine with some of this one's parts replaced (``config``, ``llm``,
        ``head``...) that computes on this one's model thread, so that one thread
        still runs all the torch work (``light_torch_thread`` says why). Its
        ``close`` leaves that thread running."""
        kept = dict(config=self.config, asr=self.asr, llm=self.llm, tts=self.tts, head=self.head)
        other = Engine(**{**kept, **parts}, model_worker=self.model_worker)
        other._borrowed_worker = True
        return other

    def close(self) -> None:
        if not self._borrowed_worker:
            self.model_executor.shutdown(wait=True, cancel_futures=True)
        self.tts_executor.shutdown(wait=True, cancel_futures=True)
