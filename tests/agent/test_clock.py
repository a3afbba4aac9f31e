"""The chunk clock's parts: input placed by media time, output cut into chunks."""
import asyncio

import numpy as np

from agent.clock import ChunkClock, InputBuffer, Timeline, TickRecord
from agent.session import Outbox

N, RATE = 160, 1000  # 160 ms chunks at a toy rate: easy numbers


def test_audio_is_placed_by_its_media_time_not_by_arrival_order():
    buf = InputBuffer(N, RATE)
    buf.put(0.160, np.full(N, 2.0, np.float32))  # chunk 1 arrives first
    buf.put(0.000, np.full(N, 1.0, np.float32))
    assert np.all(buf.take(0) == 1.0) and np.all(buf.take(1) == 2.0)


def test_a_packet_straddling_two_chunks_is_split_between_them():
    buf = InputBuffer(N, RATE)
    buf.put(0.080, np.ones(N, np.float32))
    first, second = buf.take(0), buf.take(1)
    assert first[:80].sum() == 0 and first[80:].sum() == 80 and second[:80].sum() == 80


def test_a_missing_chunk_is_silence_and_is_counted():
    buf = InputBuffer(N, RATE)
    assert np.all(buf.take(0) == 0) and buf.missing_chunks == 1


def test_audio_arriving_after_its_chunk_was_taken_is_dropped_and_counted():
    buf = InputBuffer(N, RATE)
    buf.take(0)
    buf.put(0.0, np.ones(N, np.float32))
    assert buf.late_samples == N
    assert np.all(buf.take(1) == 0)


def test_audio_far_ahead_of_the_clock_is_not_buffered_without_bound():
    buf = InputBuffer(N, RATE, max_ahead_chunks=4)
    buf.put(100.0, np.ones(N, np.float32))
    assert buf._slots == {} and buf.early_samples == N and not buf.take(0).any()


def test_audio_can_be_placed_from_the_start_of_the_next_chunk_to_be_taken():
    buf = InputBuffer(N, RATE)
    assert buf.open_from == 0.0
    buf.take(0)
    assert buf.open_from == 0.160


def test_the_clock_ticks_on_a_fixed_grid_whatever_each_tick_costs():
    async def run():
        clock = ChunkClock(0.02)
        ticks = []
        for i in range(5):
            ticks.append(await clock.tick())
            if i == 1:
                await asyncio.sleep(0.03)  # one slow tick: the next comes late, then the grid resumes
        return clock, ticks

    clock, ticks = asyncio.run(run())
    assert ticks == [0, 1, 2, 3, 4]
    assert len(clock.lags) == 5 and clock.lags[2] > 0.005
    assert set(clock.jitter_ms()) == {"p50", "p99", "max"}


def test_the_outbox_cuts_audio_into_chunks_and_reports_finished_groups():
    box = Outbox()
    box.put(np.ones(100, np.float32), "")
    box.put(np.zeros(0, np.float32), "first group")
    box.put(np.full(100, 2.0, np.float32), "second group")
    chunk, real, done, tail = box.pop(150)
    assert real == 150 and done == ["first group"] and tail == 50
    assert np.all(chunk[:100] == 1) and np.all(chunk[100:] == 2)
    chunk, real, done, tail = box.pop(150)
    assert real == 50 and done == ["second group"] and np.all(chunk[50:] == 0)
    assert box.samples == 0


def test_the_timeline_writes_one_json_line_per_tick(tmp_path):
    tl = Timeline()
    tl.add(TickRecord(0, 0.0, 0.1, 0.0, "listening", "", ""))
    tl.add(TickRecord(1, 0.16, 0.0, 0.2, "speaking", "duck", "Hello there."))
    tl.write(tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"decision": "duck"' in lines[1]


def test_urgent_model_work_runs_between_the_tokens_of_a_long_job():
    import threading
    from agent.engine import ModelWorker

    worker = ModelWorker()
    order, started = [], threading.Event()
    release = threading.Event()

    def long_generation():
        started.set()
        for token in range(3):
            release.wait()
            order.append(f"token{token}")
            worker.yield_point()

    job = worker.executor.submit(long_generation)
    started.wait()
    urgent = worker.run_urgent(lambda: order.append("urgent") or "done")
    release.set()
    assert urgent.result(timeout=10) == "done"
    job.result(timeout=10)
    assert order == ["token0", "urgent", "token1", "token2"]
    # With the thread idle, urgent work simply runs.
    assert worker.run_urgent(lambda: 42).result(timeout=10) == 42
    worker.executor.shutdown()
