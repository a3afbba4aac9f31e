"""The page in a real headless Chromium, its microphone a WAV of a spoken question.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
fd 3 in, fd 4 out, NUL-separated JSON), so nothing beyond Debian's ``chromium``
is needed. The test clicks Start, and waits (in the page, on DOM mutations) for
the user's transcript and the agent's reply to appear; the agent's audio is
seen arriving in the call's WebRTC stats.
"""
import asyncio
import itertools
import json
import os
import shutil

import numpy as np
import pytest

from agent.config import SAMPLE_RATE
from speech_encoder.audio import resample, write_wav

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium "
                                                                                         "(scripts/system-deps.sh)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]

# Resolves when the page shows the user's words and a finished agent reply (with its latency).
WAIT_FOR_REPLY = """
new Promise((resolve, reject) => {
  const log = document.getElementById("transcript");
  const check = () => {
    const user = log.querySelector("li.user .text");
    const agent = log.querySelector("li.agent .meta");
    if (user && agent) {
      observer.disconnect();
      resolve({user: user.textContent, agent: agent.parentElement.querySelector(".text").textContent,
               meta: agent.textContent, states: window.__states});
    }
  };
  const observer = new MutationObserver(check);
  observer.observe(log, {childList: true, subtree: true, characterData: true});
  setTimeout(() => { observer.disconnect(); reject(new Error("no reply on the page: "
    + document.body.innerText)); }, %d);
  check();
})
"""
RECORD_STATES = """
window.__states = [];
new MutationObserver(() => window.__states.push(document.getElementById("state").textContent))
  .observe(document.getElementById("state"), {childList: true, characterData: true, subtree: true});
"""


class Chromium:
    """A headless Chromium and one DevTools session on its first page."""

    def __init__(self, args: list[str]):
        self.args = args
        self.proc = None
        self.session = None
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: dict[str, list[asyncio.Future]] = {}
        self._reader_task = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        to_browser, browser_in = os.pipe()[::-1]  # we write to_browser; it reads browser_in as fd 3
        browser_out, from_browser = os.pipe()[::-1]  # it writes browser_out as fd 4; we read from_browser
        # Move the child's ends out of the way of 3 and 4 before dup2-ing them there.
        high_in, high_out = (os.dup2(fd, 100 + i) for i, fd in enumerate((browser_in, browser_out)))

        def child_fds():
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = await asyncio.create_subprocess_exec(
            "chromium", *self.args, "--remote-debugging-pipe", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=child_fds, pass_fds=(3, 4))
        for fd in (browser_in, browser_out, high_in, high_out):
            os.close(fd)
        self._reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self._reader), os.fdopen(from_browser, "rb"))
        self._writer_transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(to_browser, "wb"))
        self._reader_task = loop.create_task(self._read(), name="cdp-reader")
        targets = await self.send("Target.getTargets")
        page = next(t for t in targets["targetInfos"] if t["type"] == "page")
        self.session = (await self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True))["sessionId"]
        await self.send("Page.enable", session=True)
        await self.send("Runtime.enable", session=True)
        self.on("Runtime.consoleAPICalled", lambda p: self.console.append(
            " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])))
        self.on("Runtime.exceptionThrown", lambda p: self.console.append(json.dumps(p["exceptionDetails"])[:500]))

    async def _read(self) -> None:
        while True:
            raw = await self._reader.readuntil(b"\0")
            msg = json.loads(raw[:-1])
            if "id" in msg:
                future = self._pending.pop(msg["id"])
                if "error" in msg:
                    future.set_exception(RuntimeError(f"CDP: {msg['error']}"))
                else:
                    future.set_result(msg["result"])
            else:
                for handler in self._events.get(msg["method"], []):
                    handler(msg.get("params", {}))

    def on(self, method: str, handler) -> None:
        self._events.setdefault(method, []).append(handler)

    async def send(self, method: str, session: bool = False, **params) -> dict:
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        self._writer_transport.write(json.dumps(msg).encode() + b"\0")
        return await asyncio.wait_for(future, 120)

    async def evaluate(self, expression: str, await_promise: bool = False):
        result = await self.send("Runtime.evaluate", session=True, expression=expression, awaitPromise=await_promise,
                                 returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"in the page: {result['exceptionDetails']}\nconsole: {self.console}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        loaded = asyncio.get_running_loop().create_future()
        self.on("Page.loadEventFired", lambda p: loaded.done() or loaded.set_result(True))
        await self.send("Page.navigate", session=True, url=url)
        await asyncio.wait_for(loaded, 30)

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.send("Browser.close"), 5)
            except (TimeoutError, RuntimeError, ConnectionError):
                self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader_task:
            self._reader_task.cancel()
            await asyncio.wait([self._reader_task], timeout=5)
        self._writer_transport.close()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def microphone_wav(question, tmp_path_factory):
    """The fake microphone: 2.5 s of silence (the call connects), the question, then silence."""
    silence = np.zeros(int(2.5 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([silence, question, silence, np.zeros(30 * SAMPLE_RATE, np.float32)])
    path = tmp_path_factory.mktemp("mic") / "question.wav"
    write_wav(path, resample(audio, SAMPLE_RATE, 48000), 48000)
    return path


def test_the_page_shows_the_conversation_and_the_agents_audio_arrives(server, microphone_wav, tmp_path):
    async def run():
        browser = Chromium(FLAGS + [f"--use-file-for-fake-audio-capture={microphone_wav}%noloop",
                                    f"--user-data-dir={tmp_path / 'profile'}"])
        await browser.start()
        try:
            await browser.navigate(server.url)
            assert await browser.evaluate("document.getElementById('toggle').textContent") == "Start talking"
            await browser.evaluate(RECORD_STATES)
            await browser.evaluate("document.getElementById('toggle').click()")
            shown = await browser.evaluate(WAIT_FOR_REPLY % 120_000, await_promise=True)
            stats = await browser.evaluate("window.duplex.stats()", await_promise=True)
            shot = await browser.send("Page.captureScreenshot", session=True, format="png")
            await browser.evaluate("document.getElementById('toggle').click()")  # hang up
            return shown, stats, shot, browser.console
        finally:
            await browser.close()

    shown, stats, shot, console = asyncio.run(run())
    import base64
    (tmp_path / "page.png").write_bytes(base64.b64decode(shot["data"]))
    print(f"\npage: user {shown['user']!r}; agent {shown['agent']!r} ({shown['meta']}); states {shown['states']}")
    print(f"WebRTC stats in the page: {stats}; screenshot {tmp_path / 'page.png'}")
    assert "capital of france" in shown["user"].lower(), (shown, console)
    assert "paris" in shown["agent"].lower(), shown
    assert shown["meta"].startswith("latency ")
    assert {"listening", "thinking", "speaking"} <= set(shown["states"])
    assert stats["connection"] == "connected"
    assert stats["inbound"]["packetsReceived"] > 50 and stats["inbound"]["bytesReceived"] > 5000
    assert stats["inbound"]["totalAudioEnergy"] > 0, stats  # the agent's audio was heard, not just silence
    assert stats["outbound"]["packetsSent"] > 50


def test_a_denied_microphone_gets_a_clear_message(server, tmp_path):
    async def run():
        flags = [f for f in FLAGS if f != "--use-fake-ui-for-media-stream"]
        browser = Chromium(flags + ["--deny-permission-prompts", f"--user-data-dir={tmp_path / 'profile'}"])
        await browser.start()
        try:
            await browser.navigate(server.url)
            await browser.evaluate("document.getElementById('toggle').click()")
            return await browser.evaluate("""new Promise((resolve) => {
                const error = document.getElementById("error");
                const done = () => !error.hidden && resolve({error: error.textContent,
                    button: document.getElementById("toggle").textContent});
                new MutationObserver(done).observe(error, {attributes: true, childList: true, subtree: true});
                done();
            })""", await_promise=True)
        finally:
            await browser.close()

    shown = asyncio.run(run())
    assert "Microphone access was denied" in shown["error"], shown
    assert shown["button"] == "Start talking"  # back to the start, nothing left half-open
