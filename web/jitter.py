"""Incoming audio packets handed on as they arrive, in order, without a prefetch.

aiortc's receiver puts every RTP packet through a ``JitterBuffer`` that, for
audio, holds four packets (80 ms of Opus) before it releases the oldest, and
releases at most one per arrival: after a lost packet it fills to its capacity
and then stays full, 280 ms behind for the rest of the call (aiortc issue 543).
Both sides of a call here already place audio by its RTP timestamp on a
timeline of their own (``InputBuffer`` on the server, the recording on the
caller), with an allowance of their own for jitter, so the receiver's buffer only
adds delay. ``InOrderAudioBuffer`` passes each packet on at once; a packet older
than one already passed on (reordered or duplicated) is dropped and counted, a
gap is left to the timeline to fill with silence, and a jump of more than 2 s
either way (the sender restarted its numbering) is followed.

``install(pc)`` swaps it into the audio receivers of a peer connection. It reaches
into a private attribute of ``RTCRtpReceiver`` (there is no public way to choose
the buffer), checked against the pinned aiortc: where the attribute is not what
it was, the receiver keeps its own buffer and a warning says so.
"""
from __future__ import annotations

import logging

from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add

log = logging.getLogger(__name__)
_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"  # RTCRtpReceiver's own, name-mangled
RESTART = 100  # packets (2 s): a sequence number further from the expected one than this starts afresh


class InOrderAudioBuffer:
    """A jitter buffer of no depth, for audio whose packets are whole frames (Opus).
    The receiver calls only ``add``, as it does on aiortc's ``JitterBuffer``."""

    def __init__(self) -> None:
        self._expected: int | None = None  # the sequence number that follows the last one passed on
        self.passed = 0
        self.lost = 0  # sequence numbers skipped over (may still come, then counted as stale)
        self.stale = 0  # arrived after a later packet had been passed on

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self._expected is not None:
            ahead = uint16_add(packet.sequence_number, -self._expected)
            behind = uint16_add(self._expected, -packet.sequence_number)
            if 0 < behind <= RESTART:  # a later packet already went
                self.stale += 1
                return False, None
            if ahead <= RESTART:
                self.lost += ahead
            # else: a jump of seconds either way, the sender restarted its numbering: follow it
        self._expected = uint16_add(packet.sequence_number, 1)
        self.passed += 1
        return False, JitterFrame(data=packet._data, timestamp=packet.timestamp)


def install(pc: RTCPeerConnection) -> list[InOrderAudioBuffer]:
    """Give every audio receiver of ``pc`` an ``InOrderAudioBuffer``; returns those installed.
    Call it after the remote description is set and before media flows (on "track")."""
    buffers = []
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        current = getattr(receiver, _ATTRIBUTE, None)
        if transceiver.kind != "audio" or isinstance(current, InOrderAudioBuffer):
            continue
        if not isinstance(current, JitterBuffer):
            log.warning("aiortc's receiver has no jitter buffer where expected: keeping its own (80 ms more delay)")
            continue
        buffer = InOrderAudioBuffer()
        setattr(receiver, _ATTRIBUTE, buffer)
        buffers.append(buffer)
    return buffers
