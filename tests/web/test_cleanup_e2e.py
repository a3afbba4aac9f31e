"""Calls come and go; the server keeps nothing of them.

50 connect/disconnect cycles: each waits for the session's hello, then hangs up
the way a closed tab does (the peer connection goes away). Afterwards the
server has no session, no ``Call`` or ``Session`` object is left, and this process (server and client) has the same
number of threads and about the same memory as after the first few calls.
"""
import asyncio
import gc

import pytest

from agent.session import Session
from web.rtc import Call, CallOptions

from tests.web.helpers import process_numbers, sessions, wait_until
from web.client import RtcClient

pytestmark = pytest.mark.e2e
CYCLES = 50
WARM_CYCLES = 10  # the first calls grow pools that stay (the executors' threads, torch's allocator)


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
    threads0, rss0 = process_numbers()
    for _ in range(CYCLES):
        one_call(server)
    threads1, rss1 = process_numbers()
    print(f"\nafter {WARM_CYCLES} calls: {threads0} threads, {rss0:.0f} MB; "
          f"after {CYCLES} more: {threads1} threads, {rss1:.0f} MB ({rss1 - rss0:+.1f} MB)")
    assert sessions(server) == 0
    assert threads1 <= threads0
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
