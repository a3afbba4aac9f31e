"""The page in a real headless Firefox: it connects, gets the session's events and the agent's audio.

Firefox is driven over Marionette (its own protocol: TCP, "length:json"
messages), so nothing beyond Debian's ``firefox-esr`` is needed. Its fake
microphone is a tone, not speech: this checks the WebRTC path (offer, Opus
both ways, data channel, page updates), while the Chromium test checks a whole
spoken exchange.
"""
import asyncio
import json
import shutil
import socket

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("firefox-esr"), reason="needs firefox-esr")]
PREFS = {
    "media.navigator.streams.fake": True,  # a fake microphone
    "media.navigator.permission.disabled": True,  # no permission prompt
    # A user who allows the microphone gets real host candidates; the pref above does not
    # count as allowing, and mDNS (.local) candidates cannot be resolved on this machine.
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.autoplay.default": 0,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
}


class Marionette:
    """A headless Firefox and one Marionette session."""

    def __init__(self, profile):
        self.profile = profile
        self.proc = None
        self._ids = 0

    async def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.profile.mkdir(parents=True, exist_ok=True)
        prefs = {**PREFS, "marionette.port": port}
        (self.profile / "user.js").write_text("".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n"
                                                      for k, v in prefs.items()))
        self.proc = await asyncio.create_subprocess_exec(
            "firefox-esr", "--headless", "--marionette", "--no-remote", "--profile", str(self.profile),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(300):  # Firefox opens the port when it is ready; there is no other signal
            try:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise RuntimeError("Firefox did not open its Marionette port")
        await self._read()  # the greeting
        await self.send("WebDriver:NewSession", capabilities={"acceptInsecureCerts": True,
                                                             "timeouts": {"script": 90_000}})

    async def _read(self):
        length = int((await self.reader.readuntil(b":"))[:-1])
        return json.loads(await self.reader.readexactly(length))

    async def send(self, command: str, **params):
        self._ids += 1
        data = json.dumps([0, self._ids, command, params]).encode()
        self.writer.write(str(len(data)).encode() + b":" + data)
        while True:
            reply = await asyncio.wait_for(self._read(), 120)
            if reply[0] == 1 and reply[1] == self._ids:
                if reply[2]:
                    raise AssertionError(f"Marionette {command}: {reply[2]}")
                return reply[3]

    async def script(self, body: str):
        """Run ``body`` (an async function body) in the page; return its value."""
        wrapped = f"const done = arguments[arguments.length - 1]; (async () => {{ {body} }})().then(done, " \
                  f"(e) => done({{error: String(e)}}));"
        return (await self.send("WebDriver:ExecuteAsyncScript", script=wrapped, args=[]))["value"]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.send("Marionette:Quit"), 10)
        except (TimeoutError, AssertionError, ConnectionError, asyncio.IncompleteReadError):
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 20)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def test_firefox_connects_and_gets_events_and_audio(server, tmp_path):
    async def run():
        firefox = Marionette(tmp_path / "profile")
        await firefox.start()
        try:
            await firefox.send("WebDriver:Navigate", url=server.url)
            return await firefox.script("""
                document.getElementById("toggle").click();
                const connection = document.getElementById("connection");
                await new Promise((resolve) => {
                  const ok = () => connection.textContent.startsWith("connected") && resolve();
                  new MutationObserver(ok).observe(connection, {childList: true, characterData: true, subtree: true});
                  ok();
                });
                await new Promise((r) => setTimeout(r, 3000));  // let some of the agent's audio arrive
                const stats = await window.duplex.stats();
                const shown = {connection: connection.textContent, state: document.getElementById("state").textContent};
                document.getElementById("toggle").click();
                return {...shown, after: connection.textContent, error: document.getElementById("error").textContent,
                        stats};
            """)
        finally:
            await firefox.close()

    shown = asyncio.run(run())
    print(f"\nFirefox: {shown}")
    assert shown["connection"] == "connected: speak any time" and not shown["error"], shown
    assert shown["state"] in ("listening", "thinking", "speaking")  # the session's events reach the page
    assert shown["after"] == "not connected"  # the Stop button hangs up
    assert shown["stats"]["connection"] == "connected"
    assert shown["stats"]["inbound"]["packetsReceived"] > 50
    assert shown["stats"]["outbound"]["packetsSent"] > 50
