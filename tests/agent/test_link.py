"""The link model on synthetic chunks: delay, jitter, reordering and loss.

Each chunk of the sent stream holds its own index in every sample, so what the
receiver's ``InputBuffer`` rebuilds shows where every sample landed. The
receiving loop is the simulation's: on tick k (time (k+1)T) take every packet
that has arrived, place it by its playout time, and take chunk k.
"""
import numpy as np
import pytest

from agent.clock import InputBuffer
from agent.transports.link import Link, LinkConfig

RATE = 16000
N = 2560  # 160 ms chunks
T = N / RATE


def stream(n_chunks):
    return [np.full(N, k + 1, np.float32) for k in range(n_chunks)]


def transmit(link, chunks, extra_ticks=10):
    """Send chunk k at (k+1)T as media [(k+1)T, (k+2)T); return what the receiver takes, joined."""
    inbuf = InputBuffer(N, RATE)
    heard = []
    for k in range(len(chunks) + extra_ticks):
        now = (k + 1) * T
        for p in link.receive(now):
            inbuf.put(p.playout, p.samples)
        heard.append(inbuf.take(k))
        if k < len(chunks):
            link.send(now, now, chunks[k])
    return np.concatenate(heard), inbuf


def sent_track(chunks, extra_ticks=10):
    """The stream on the sender's timeline: chunk k plays over [(k+1)T, (k+2)T)."""
    return np.concatenate([np.zeros(N, np.float32)] + chunks + [np.zeros(N * (extra_ticks - 1), np.float32)])


def delayed(track, seconds):
    shift = int(round(seconds * RATE))
    return np.concatenate([np.zeros(shift, np.float32), track[:len(track) - shift]])


def test_a_packet_arrives_after_the_latency_and_not_before():
    link = Link(LinkConfig(latency_ms=100))
    link.send(1.0, 1.0, np.ones(N, np.float32))
    assert link.receive(1.099) == []
    (packet,) = link.receive(1.1)
    assert packet.arrival == pytest.approx(1.1) and packet.playout == pytest.approx(1.1)


def test_a_steady_delay_shifts_the_stream_by_exactly_the_latency():
    chunks = stream(20)
    link = Link(LinkConfig(latency_ms=100))  # not a whole number of chunks
    heard, inbuf = transmit(link, chunks)
    np.testing.assert_array_equal(heard, delayed(sent_track(chunks), 0.1))
    assert inbuf.late_samples == 0 and link.stats.lost == 0


def test_no_latency_hands_each_chunk_over_one_tick_later():
    chunks = stream(5)
    heard, _ = transmit(Link(LinkConfig()), chunks)
    np.testing.assert_array_equal(heard, sent_track(chunks))


def test_jitter_reorders_packets_and_the_jitter_buffer_puts_them_back_in_order():
    chunks = stream(200)
    link = Link(LinkConfig(latency_ms=80, jitter_ms=400), seed=1)  # jitter beyond a chunk: overtaking
    heard, inbuf = transmit(link, chunks)
    assert link.stats.reordered > 10
    np.testing.assert_array_equal(heard, delayed(sent_track(chunks), 0.48))  # latency + buffer
    assert inbuf.late_samples == 0


def test_a_jitter_buffer_shallower_than_the_jitter_loses_late_packets_to_silence():
    chunks = stream(200)
    link = Link(LinkConfig(latency_ms=80, jitter_ms=400, buffer_ms=100), seed=1)
    heard, inbuf = transmit(link, chunks)
    expected = delayed(sent_track(chunks), 0.18)
    assert inbuf.late_samples > 0
    wrong = heard != expected
    assert np.all(heard[wrong] == 0)  # whatever came late is silence, never misplaced audio


def test_loss_drops_that_share_of_packets_and_they_are_heard_as_silence():
    chunks = stream(2000)
    link = Link(LinkConfig(latency_ms=160, loss=0.1), seed=3)
    heard, _ = transmit(link, chunks)
    assert link.stats.sent == 2000
    assert link.stats.lost == pytest.approx(200, abs=40)
    expected = delayed(sent_track(chunks), 0.16)
    received = {int(v) for v in np.unique(heard) if v}
    assert len(received) == 2000 - link.stats.lost
    assert np.all((heard == expected) | (heard == 0))


def test_the_same_seed_gives_the_same_network():
    chunks = stream(100)
    runs = [transmit(Link(LinkConfig(latency_ms=40, jitter_ms=300, loss=0.2), seed=7), chunks)[0] for _ in range(2)]
    np.testing.assert_array_equal(*runs)


@pytest.mark.parametrize("kwargs", [{"latency_ms": -1}, {"jitter_ms": -5}, {"loss": 1.0}, {"loss": -0.1}])
def test_impossible_links_are_refused(kwargs):
    with pytest.raises(ValueError):
        LinkConfig(**kwargs)
