"""Calls come and go; the server keeps nothing of them.

50 connect/disconnect cycles: each waits for the session's hello, then hangs up
the way a closed tab does (the peer connection goes away). Afterwards the
server has no session, no ``Call`` or ``Session`` object is left, and this
process (server and client) has about the same memory as after the first few
calls and no more threads, but for executor pools that grew within their bound
(aiortc encodes each outgoing frame on the event loop's default executor, which
starts a second thread the first time two encodings overlap).
"""
import asyncio
import gc
import os

import pytest

from agent.session import Session
from web.rtc import Call, CallOptions

from tests.web.helpers import process_numbers, sessions, thread_census, wait_until
from web.client import RtcClient

pytestmark = pytest.mark.e2e
CYCLES = 50
WARM_CYCLES = 10  # the first calls grow pools that stay (the executors' threads, torch's allocator)
POOL_BOUND = min(32, (os.cpu_count() or 1) + 4)  # the largest executor here: asyncio's default


def one_call(server) -> None:
    async def call():
        client = RtcClient(server.url)
        try:
            await client.connect()
        finally:
            await client.close()

    asyncio.run(call())
    wait_until(lambda: sessions(server) == 0, 15, "the server has dropped the session")


def test_fifty_calls_leave_threads_and_memory_flat(start_server):
    server = start_server(max_sessions=1)
    for _ in range(WARM_CYCLES):
        one_call(server)
    (python0, native0), rss0 = thread_census(), process_numbers()[1]
    for _ in range(CYCLES):
        one_call(server)
    (python1, native1), rss1 = thread_census(), process_numbers()[1]
    print(f"\nafter {WARM_CYCLES} calls: {dict(python0)} + {native0} native, {rss0:.0f} MB; "
          f"after {CYCLES} more: {dict(python1)} + {native1} native, {rss1:.0f} MB ({rss1 - rss0:+.1f} MB)")
    assert sessions(server) == 0
    grown = {kind: n for kind, n in python1.items() if n > python0[kind]}
    assert all(kind.endswith("_*") and n <= POOL_BOUND for kind, n in grown.items()), f"threads outlived calls: {grown}"
    assert native1 <= native0
    assert rss1 - rss0 < 30
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) in (Session, Call)], "a call or session outlived its hang-up"


def test_a_peer_that_goes_silent_without_hanging_up_is_dropped_after_the_media_timeout(start_server):
    """A frozen tab or a crashed browser sends no RTP and no DTLS close: the media timeout ends the call."""
    server = start_server(call=CallOptions(media_timeout_s=2))

    async def call():
        client = RtcClient(server.url)
        try:
            await client.connect()
            client.mic.stop()  # the client's sender stops sending RTP; the connection stays up
            return await client.wait_for(lambda e: e["type"] == "hangup", 15)
        finally:
            await client.close()

    hangup = asyncio.run(call())
    assert hangup["reason"] == "no audio from the browser for 2 s"
    wait_until(lambda: sessions(server) == 0, 5, "the server has dropped the session")
