"""The calls of one server: offer checks, the session cap, and clean-up.

Every offer is checked before a peer connection is made for it: size, type,
SDP syntax, exactly one two-way audio section offering Opus at 48 kHz, ICE and
DTLS parameters, and that it is not an offer already answered. A bad offer is
an ``OfferError`` (the server answers 4xx with its message); an offer beyond
the session cap is ``ServerBusy`` (503). A call leaves the registry when it has
hung up, whatever the reason.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.sdp import SessionDescription

from agent.engine import Engine
from web.rtc import Call, CallOptions

log = logging.getLogger(__name__)


class OfferError(Exception):
    """An offer the server will not answer; ``status`` is the HTTP status to reply with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ServerBusy(OfferError):
    def __init__(self, limit: int):
        super().__init__(503, f"the server is busy: all {limit} voice sessions are in use; try again in a minute")


@dataclass(frozen=True)
class IceServer:
    urls: str  # "stun:host:port" or "turn:host:port?transport=udp"
    username: str | None = None
    credential: str | None = None

    def to_json(self) -> dict:
        d = {"urls": self.urls}
        if self.username:
            d.update(username=self.username, credential=self.credential or "")
        return d


def check_offer(sdp: str, kind: str, max_bytes: int) -> str:
    """Raise ``OfferError`` unless this is an offer we can answer; return its ICE ufrag."""
    if kind != "offer":
        raise OfferError(400, f"expected an SDP of type 'offer', got {kind!r}")
    if len(sdp.encode()) > max_bytes:
        raise OfferError(413, f"the SDP is larger than {max_bytes} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError(400, "malformed SDP: it must start with 'v=0'")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as e:  # the parser signals bad input with asserts, ValueError, KeyError...
        raise OfferError(400, f"malformed SDP ({type(e).__name__}: {e})") from None
    audio = [m for m in parsed.media if m.kind == "audio"]
    others = sorted({m.kind for m in parsed.media} - {"audio", "application"})
    if not audio:
        raise OfferError(400, "the offer has no audio: add the microphone's track before creating the offer")
    if len(audio) > 1:
        raise OfferError(400, f"the offer has {len(audio)} audio sections; one is expected")
    if others:
        raise OfferError(400, f"only audio (and a data channel) is supported; the offer also has {', '.join(others)}")
    media = audio[0]
    if (media.direction or "sendrecv") != "sendrecv":
        raise OfferError(400, f"the audio must go both ways (sendrecv), the offer says {media.direction}")
    codecs = {(c.mimeType.lower(), c.clockRate) for c in media.rtp.codecs}
    if ("audio/opus", 48000) not in codecs:
        offered = ", ".join(sorted(f"{m.split('/')[-1]}/{r}" for m, r in codecs)) or "none"
        raise OfferError(400, f"the audio must offer Opus at 48 kHz; offered: {offered}")
    if not media.ice or not media.ice.usernameFragment or not media.ice.password:
        raise OfferError(400, "the offer has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
    if not media.dtls or not media.dtls.fingerprints:
        raise OfferError(400, "the offer has no DTLS fingerprint (a=fingerprint)")
    return media.ice.usernameFragment


class CallManager:
    """Answers offers with calls on the shared engine; at most ``max_sessions`` at once."""

    def __init__(self, engine: Engine, max_sessions: int, ice_servers: tuple[IceServer, ...] = (),
                 options: CallOptions = CallOptions(), max_sdp_bytes: int = 16384, answer_timeout_s: float = 15.0):
        self.engine = engine
        self.max_sessions = max_sessions
        self.ice_servers = ice_servers
        self.options = options
        self.max_sdp_bytes = max_sdp_bytes
        self.answer_timeout_s = answer_timeout_s
        self.calls: dict[str, Call] = {}
        self._ufrags: dict[str, str] = {}  # offer ICE ufrag -> call id, to refuse repeats

    async def answer(self, sdp: str, kind: str) -> RTCSessionDescription:
        ufrag = check_offer(sdp, kind, self.max_sdp_bytes)
        if ufrag in self._ufrags:
            raise OfferError(409, "this offer was already answered; a new call needs a new RTCPeerConnection")
        if len(self.calls) >= self.max_sessions:
            raise ServerBusy(self.max_sessions)
        config = RTCConfiguration([RTCIceServer(s.urls, s.username, s.credential) for s in self.ice_servers])
        call = Call(RTCPeerConnection(config), self.engine, self.options, self._forget)
        self.calls[call.id] = call  # registered before the first await: the cap holds under a flood
        self._ufrags[ufrag] = call.id
        try:
            answer = await asyncio.wait_for(self._negotiate(call, sdp), self.answer_timeout_s)
        except BaseException as e:
            await call.close("negotiation failed")
            if isinstance(e, TimeoutError):
                raise OfferError(504, f"could not answer within {self.answer_timeout_s:g} s (ICE gathering)") from None
            if isinstance(e, Exception) and not isinstance(e, OfferError):
                raise OfferError(400, f"the offer could not be applied: {e}") from None
            raise
        call.start()
        log.info("%s: answered (%d of %d sessions)", call.id, len(self.calls), self.max_sessions)
        return answer

    async def _negotiate(self, call: Call, sdp: str) -> RTCSessionDescription:
        pc = call.pc
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        transceiver = next(t for t in pc.getTransceivers() if t.kind == "audio")
        opus = [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]
        transceiver.setCodecPreferences(opus)
        pc.addTrack(call.track)
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        for ufrag in [u for u, cid in self._ufrags.items() if cid == call.id]:
            del self._ufrags[ufrag]
        log.info("%s: closed (%s); %d session(s) left", call.id, call.hangup_reason, len(self.calls))

    async def close_all(self) -> None:
        calls = list(self.calls.values())
        if calls:
            await asyncio.gather(*(c.close("the server is shutting down") for c in calls))
