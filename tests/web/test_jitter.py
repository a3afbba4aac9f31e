"""Incoming audio packets go on as they arrive: no prefetch, no lasting delay after a loss."""
import asyncio
from fractions import Fraction

import numpy as np
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtp import RtpPacket

from web import jitter
from web.audio import FRAME_SAMPLES_48K, RTC_RATE, mono_to_frames


def packet(seq: int) -> RtpPacket:
    p = RtpPacket(sequence_number=seq % 65536, timestamp=(seq * FRAME_SAMPLES_48K) % 2 ** 32)
    p._data = seq.to_bytes(4, "big")
    return p


def released(buffer, seqs) -> list[int | None]:
    out = []
    for s in seqs:
        _, frame = buffer.add(packet(s))
        out.append(None if frame is None else int.from_bytes(frame.data, "big"))
    return out


def test_each_packet_in_order_is_passed_on_as_it_arrives():
    assert released(jitter.InOrderAudioBuffer(), range(10)) == list(range(10))


def test_a_lost_packet_holds_nothing_back_and_is_counted():
    buffer = jitter.InOrderAudioBuffer()
    seqs = [s for s in range(30) if s != 8]
    assert released(buffer, seqs) == seqs
    assert (buffer.passed, buffer.lost, buffer.stale) == (29, 1, 0)


def test_aiortc_own_buffer_after_the_same_loss_holds_14_packets_for_the_rest_of_the_call():
    # Why ours replaces it: four packets (80 ms) behind from the start, fourteen (280 ms) after one loss.
    seqs = [s for s in range(40) if s != 8]
    out = released(JitterBuffer(capacity=16, prefetch=4), seqs)
    assert out[:4] == [None] * 4 and out[4] == 0
    assert [seq - frame for seq, frame in zip(seqs[-10:], out[-10:])] == [14] * 10


def test_a_packet_older_than_one_passed_on_is_dropped_as_stale():
    buffer = jitter.InOrderAudioBuffer()
    assert released(buffer, [0, 1, 3, 2, 3, 4]) == [0, 1, 3, None, None, 4]
    assert (buffer.lost, buffer.stale) == (1, 2)  # 2 skipped, then came late; 3 came twice


def test_sequence_numbers_wrap_around():
    buffer = jitter.InOrderAudioBuffer()
    seqs = list(range(65530, 65542))  # 65535 -> 0
    assert released(buffer, seqs) == seqs
    assert (buffer.lost, buffer.stale) == (0, 0)


def test_a_sender_that_restarts_its_numbering_is_followed_not_dropped():
    buffer = jitter.InOrderAudioBuffer()
    seqs = [5000, 5001, 5002, 120, 121, 122, 30000, 30001]  # far back, then far ahead
    assert released(buffer, seqs) == seqs
    assert (buffer.lost, buffer.stale) == (0, 0)


class Tone(MediaStreamTrack):
    kind = "audio"

    def __init__(self):
        super().__init__()
        self.pts = 0

    async def recv(self):
        await asyncio.sleep(0.02)
        x = (0.1 * np.sin(np.arange(FRAME_SAMPLES_48K) * 0.05)).astype(np.float32)
        frame = mono_to_frames(x, self.pts)[0]
        frame.time_base = Fraction(1, RTC_RATE)
        self.pts += FRAME_SAMPLES_48K
        return frame


def test_installed_on_a_real_peer_connection_the_audio_still_flows_in_order():
    async def call():
        caller, callee = RTCPeerConnection(), RTCPeerConnection()
        caller.addTrack(Tone())
        installed, heard = [], []

        def on_track(track):
            installed.extend(jitter.install(callee))

            async def listen():
                while len(heard) < 25:
                    heard.append((await track.recv()).pts)
            asyncio.ensure_future(listen())

        callee.on("track", on_track)
        try:
            await caller.setLocalDescription(await caller.createOffer())
            await callee.setRemoteDescription(caller.localDescription)
            await callee.setLocalDescription(await callee.createAnswer())
            await caller.setRemoteDescription(callee.localDescription)
            for _ in range(300):
                if len(heard) >= 25:
                    break
                await asyncio.sleep(0.05)
        finally:
            await caller.close()
            await callee.close()
        return installed, heard

    installed, heard = asyncio.run(call())
    assert len(installed) == 1 and installed[0].passed >= 25
    assert len(heard) == 25 and heard == sorted(heard)
