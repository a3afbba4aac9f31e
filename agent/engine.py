"""The models of one process, loaded once and shared by every session.

Torch models (Whisper, the LLM) run on one worker thread so they never compete
for the cores with each other; the voice runs on its own worker(s). The event
loop only hands work to these executors and takes results back.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from agent import models
from agent.config import Config
from agent.llm import ChatLLM
from speech_encoder.asr import WhisperASR
from tts.base import TTSBackend

log = logging.getLogger(__name__)


@dataclass
class LoadTimes:
    provision_s: float
    asr_s: float
    llm_s: float
    tts_s: float


class Engine:
    def __init__(self, config: Config, asr: WhisperASR, llm: ChatLLM, tts: TTSBackend):
        self.config = config
        self.asr = asr
        self.llm = llm
        self.tts = tts
        self.model_executor = ThreadPoolExecutor(1, thread_name_prefix="duplex-model")
        self.tts_executor = ThreadPoolExecutor(2, thread_name_prefix="duplex-tts")
        self.load_times: LoadTimes | None = None

    @classmethod
    def load(cls, config: Config, provision: bool = True) -> "Engine":
        """Provision (if allowed) and load the configured models; blocks for seconds."""
        from tts.piper import PiperTTS

        t0 = time.monotonic()
        get = models.ensure if provision else models.require
        names = models.names_for(config.asr_model, config.llm)
        paths = {n: get(config.cache_dir, n) for n in names}
        t1 = time.monotonic()
        asr = WhisperASR(paths[names[0]] / "model.pt", config.language, config.torch_threads)
        t2 = time.monotonic()
        llm = ChatLLM(paths[names[1]], config.torch_threads, config.llm_dtype)
        t3 = time.monotonic()
        if config.tts != "piper":
            raise ValueError(f"unknown TTS backend {config.tts!r}; available: piper")
        tts = PiperTTS(paths[names[2]], config.tts_threads)
        t4 = time.monotonic()
        engine = cls(config, asr, llm, tts)
        engine.load_times = LoadTimes(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        log.info("models ready: %s", engine.load_times)
        return engine

    def close(self) -> None:
        self.model_executor.shutdown(wait=True, cancel_futures=True)
        self.tts_executor.shutdown(wait=True, cancel_futures=True)
