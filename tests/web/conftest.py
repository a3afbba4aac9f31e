"""Fixtures for the browser server: a real server on loopback, on the real models."""
from __future__ import annotations

import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from speech_encoder.audio import load_audio
from tests.conftest import synthesize


@pytest.fixture(scope="module")
def start_server(engine):
    """start_server(**settings) -> a running ServerThread on 127.0.0.1 (stopped after the module)."""
    from web.rtc import CallOptions
    from web.server import ServerSettings, ServerThread, create_app

    servers = []

    def start(call: CallOptions = CallOptions(), **settings) -> ServerThread:
        server = ServerThread(create_app(ServerSettings(call=call, **settings), engine=engine))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    """'What is the capital of France?' as float32 16 kHz, with half a second of silence before."""
    path = synthesize("What is the capital of France?", tmp_path_factory.mktemp("question") / "q.wav")
    return np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), load_audio(path, SAMPLE_RATE)])
