"""What the server answers to offers it cannot or must not take, and that it stays healthy.

Each bad request gets a 4xx (or 503 when full) with a message that says what
is wrong; afterwards a real call still works.
"""
import asyncio
import re

import httpx
import pytest
from aiortc import RTCPeerConnection

from tests.web.helpers import sessions, wait_until
from web.client import OfferRefused, RtcClient, ScriptedMic, post_offer
from web.rtc import CallOptions
from web.server import ServerSettings

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token-for-tests"


def make_offer(audio: bool = True, channel: bool = True) -> str:
    """A real browser-like offer from aiortc (the peer connection is closed again)."""
    async def offer():
        pc = RTCPeerConnection()
        if audio:
            pc.addTrack(ScriptedMic())
        if channel:
            pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(offer())


def post(server, body=None, content=None, headers=None):
    return httpx.post(server.url + "offer", json=body, content=content, headers=headers, timeout=30)


def refused(server, sdp, kind="offer", **kw):
    r = post(server, {"sdp": sdp, "type": kind}, **kw)
    assert 400 <= r.status_code < 600 and r.status_code != 500, r.text
    return r.status_code, r.json()["detail"]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_sessions=2, call=CallOptions(connect_timeout_s=3))


@pytest.fixture(scope="module")
def offer():
    return make_offer()


def assert_healthy(server):
    """No session left over, and a real call goes through."""
    wait_until(lambda: sessions(server) == 0, 15, "no session is left")

    async def call():
        client = RtcClient(server.url)
        try:
            return await client.connect()
        finally:
            await client.close()

    assert asyncio.run(call())["type"] == "hello"


def test_a_body_that_is_not_json_or_lacks_the_fields_is_400(server):
    assert post(server, content=b"{not json").status_code == 400
    r = post(server, {"sdp": 5})
    assert r.status_code == 400 and "type" in r.json()["detail"]


def test_malformed_sdp_is_400_with_the_reason(server, offer):
    assert refused(server, "hello") == (400, "malformed SDP: it must start with 'v=0'")
    status, detail = refused(server, re.sub(r"m=audio \d+ \S+", "m=audio nine", offer))
    assert status == 400 and "malformed" in detail
    status, detail = refused(server, re.sub(r"a=rtpmap:(\d+) opus", r"a=rtpmap:\1", offer))
    assert status == 400


def test_only_an_offer_is_answered(server, offer):
    assert refused(server, offer, kind="answer") == (400, "expected an SDP of type 'offer', got 'answer'")


def test_an_offer_without_audio_is_400(server):
    status, detail = refused(server, make_offer(audio=False))
    assert status == 400 and "no audio" in detail


def test_audio_one_way_only_is_400(server, offer):
    status, detail = refused(server, offer.replace("a=sendrecv", "a=sendonly"))
    assert status == 400 and "both ways" in detail


def test_unknown_codecs_without_opus_are_400(server, offer):
    sdp = re.sub(r"(a=rtpmap:\d+ )opus/48000/2", r"\1x-unknown/48000/2", offer)
    status, detail = refused(server, sdp)
    assert status == 400 and "Opus" in detail and "x-unknown" in detail


def test_video_is_refused(server, offer):
    video = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\na=sendrecv\r\n"
    status, detail = refused(server, offer + video)
    assert status == 400 and "video" in detail


def test_oversized_sdp_and_bodies_are_413_before_being_read_whole(server, offer):
    padded = offer + "a=x-padding:" + "x" * 20000 + "\r\n"
    assert refused(server, padded)[0] == 413
    r = post(server, content=b"x" * 10_000_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_repeated_offer_is_409_while_its_call_is_up(server):
    sdp = make_offer()
    assert post(server, {"sdp": sdp, "type": "offer"}).status_code == 200
    status, detail = refused(server, sdp)
    assert status == 409 and "already answered" in detail
    # The first answer is never applied by anyone: the call gives up after the connect timeout.
    wait_until(lambda: sessions(server) == 0, 15, "the unanswered call has timed out")


def test_beyond_the_cap_a_flood_of_offers_gets_503_and_the_server_recovers(server):
    async def flood():
        offers = await asyncio.gather(*(asyncio.to_thread(make_offer) for _ in range(12)))
        return await asyncio.gather(*(post_offer(server.url, sdp) for sdp in offers), return_exceptions=True)

    results = asyncio.run(flood())
    answered = [r for r in results if isinstance(r, dict)]
    busy = [r for r in results if isinstance(r, OfferRefused)]
    assert len(answered) == 2 and len(busy) == 10, results
    assert all(r.status == 503 and "busy" in r.detail for r in busy)
    r = post(server, {"sdp": make_offer(), "type": "offer"})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert_healthy(server)


def test_a_flood_of_connects_and_disconnects_leaves_the_server_healthy(server):
    async def churn():
        async def one():
            client = RtcClient(server.url)
            try:
                await client.connect()
            except OfferRefused as e:
                assert e.status == 503
            finally:
                await client.close()

        await asyncio.gather(*(one() for _ in range(8)))

    asyncio.run(churn())
    assert_healthy(server)


def test_a_public_host_needs_a_token():
    with pytest.raises(ValueError, match="token"):
        ServerSettings(host="0.0.0.0")
    assert ServerSettings(host="0.0.0.0", token=TOKEN).url == "http://127.0.0.1:8000/"


@pytest.fixture(scope="module")
def public_server(start_server):
    """Settings of a server on 0.0.0.0 (it listens on loopback only, for the test)."""
    return start_server(host="0.0.0.0", token=TOKEN, allowed_origins=("https://voice.example.org",))


def test_without_the_right_token_the_api_is_401(public_server, offer):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = post(public_server, {"sdp": offer, "type": "offer"}, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["detail"]
        assert httpx.get(public_server.url + "config", headers=headers).status_code == 401
    assert httpx.get(public_server.url).status_code == 200  # the page itself is public: it holds no secret


def test_a_foreign_origin_is_403_even_with_the_token(public_server, offer):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = post(public_server, {"sdp": offer, "type": "offer"}, headers={**auth, "Origin": "https://evil.example"})
    assert r.status_code == 403 and "origin" in r.json()["detail"]
    own = public_server.url.rstrip("/")
    for origin in (own, "https://voice.example.org"):
        assert httpx.get(public_server.url + "config", headers={**auth, "Origin": origin}).status_code == 200


def test_with_the_token_a_call_goes_through(public_server):
    async def call():
        client = RtcClient(public_server.url, token=TOKEN, origin=public_server.url.rstrip("/"))
        try:
            return await client.connect()
        finally:
            await client.close()

    assert asyncio.run(call())["type"] == "hello"


def test_on_loopback_a_foreign_host_name_is_refused(server):
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not reach the API."""
    r = httpx.get(server.url + "config", headers={"Host": "evil.example:8000"})
    assert r.status_code == 403 and "Host" in r.json()["detail"]
    r = httpx.get(server.url + "config", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
