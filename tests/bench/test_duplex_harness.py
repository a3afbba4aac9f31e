"""The WebRTC caller's wait for the agent (bench.duplex.wait_for_agent): mechanics
only, with a stand-in for the client's event list."""
import asyncio

import pytest

from bench import duplex


class EventsClient:
    """Events arrive on a schedule: (delay s, event) pairs."""

    def __init__(self, schedule):
        self.events = []
        self._schedule = schedule

    async def play(self):
        for delay, event in self._schedule:
            await asyncio.sleep(delay)
            self.events.append(event)

    async def wait_for(self, predicate, timeout, after=0):
        async def poll():
            while True:
                hit = next((e for e in self.events[after:] if predicate(e)), None)
                if hit:
                    return hit
                await asyncio.sleep(0.005)
        return await asyncio.wait_for(poll(), timeout)


def run(client, kind, after=0):
    async def main():
        player = asyncio.create_task(client.play())
        try:
            return await duplex.wait_for_agent(client, kind, after)
        finally:
            player.cancel()
    return asyncio.run(main())


def test_a_long_answer_is_waited_out(monkeypatch):
    monkeypatch.setattr(duplex, "REPLAY_WAIT_S", 0.05)
    client = EventsClient([(0.0, {"type": "agent_speech_start"}), (0.2, {"type": "agent_speech_end"})])
    assert run(client, "agent_speech_end") == {"type": "agent_speech_end"}


def test_a_silent_agent_is_given_up_on(monkeypatch):
    monkeypatch.setattr(duplex, "REPLAY_WAIT_S", 0.05)
    client = EventsClient([(0.0, {"type": "agent_speech_start"}), (0.0, {"type": "agent_speech_end"})])
    with pytest.raises(TimeoutError):
        run(client, "agent_speech_start", after=2)  # it has spoken and stopped; nothing new comes


def test_an_agent_that_never_stops_is_given_up_on_too(monkeypatch):
    monkeypatch.setattr(duplex, "REPLAY_WAIT_S", 0.01)
    client = EventsClient([(0.0, {"type": "agent_speech_start"})])
    with pytest.raises(TimeoutError):
        run(client, "agent_speech_end")
