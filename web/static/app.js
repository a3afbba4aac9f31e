// duplex voice chat: one RTCPeerConnection to the server, audio both ways, and the
// session's events (JSON) on the "events" data channel. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  toggle: $("toggle"), connection: $("connection"), state: $("state"), error: $("error"),
  transcript: $("transcript"), empty: $("empty"), audio: $("agent-audio"),
};
const token = new URLSearchParams(location.hash.slice(1)).get("token")
  || new URLSearchParams(location.search).get("token");

let call = null; // {pc, channel, stream} while a call is up

function authHeaders(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function setConnection(text) { ui.connection.textContent = text; }

function setState(state) {
  ui.state.textContent = state;
  ui.state.className = `state ${state}`;
}

function addLine(kind, who, text) {
  ui.empty.hidden = true;
  const li = document.createElement("li");
  li.className = kind;
  if (who) {
    const label = document.createElement("span");
    label.className = "who";
    label.textContent = who;
    li.append(label);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  ui.transcript.append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

// -- the session's events ---------------------------------------------------------------------

let agentLine = null; // the agent's reply being spoken
let userLine = null; // the user's words while they speak (streaming transcript)

function onEvent(ev) {
  switch (ev.type) {
    case "hello":
      setConnection("connected: speak any time");
      break;
    case "state":
      setState(ev.state);
      break;
    case "partial_transcript":
      if (!userLine) userLine = addLine("user partial", "you", "");
      userLine.querySelector(".text").textContent = ev.committed + ev.tentative;
      break;
    case "transcript":
      if (userLine) {
        userLine.classList.remove("partial");
        userLine.querySelector(".text").textContent = ev.text;
        userLine = null;
      } else {
        addLine("user", "you", ev.text);
      }
      agentLine = null;
      break;
    case "transcript_rejected":
      if (userLine) { userLine.remove(); userLine = null; }
      break;
    case "agent_text":
      if (!agentLine) agentLine = addLine("agent", "agent", "");
      agentLine.querySelector(".text").textContent += (agentLine.querySelector(".text").textContent ? " " : "") + ev.text;
      break;
    case "turn": {
      const line = agentLine || addLine("agent", "agent", "");
      line.querySelector(".text").textContent = ev.agent_text;
      if (ev.interrupted) line.classList.add("interrupted");
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `latency ${Math.round(ev.latency * 1000)} ms` + (ev.interrupted ? " · interrupted" : "");
      line.append(meta);
      agentLine = null;
      break;
    }
    case "hangup":
      stop();
      showError(`The server ended the call: ${ev.reason}.`);
      break;
  }
}

// -- the call ---------------------------------------------------------------------------------

function micError(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this page (the icon in the address bar) and press Start again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Plug one in and press Start again.";
    case "NotReadableError":
      return "The microphone is in use by another application, or the system blocked it.";
    default:
      return `Could not open the microphone: ${err && err.message ? err.message : err}`;
  }
}

function iceGatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { clearTimeout(timer); pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    const timer = setTimeout(done, timeoutMs); // send what we have: host candidates come first
    pc.addEventListener("icegatheringstatechange", check);
  });
}

async function start() {
  showError("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("This browser cannot use a microphone here: open the page over HTTPS or from localhost.");
  }
  if (!window.RTCPeerConnection) throw new Error("This browser does not support WebRTC.");
  setConnection("asking for the microphone…");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (err) {
    throw new Error(micError(err));
  }
  call = { stream, pc: null, channel: null };

  setConnection("connecting…");
  const cfg = await fetch("config", { headers: authHeaders() });
  if (!cfg.ok) throw new Error(await describe(cfg));
  const { iceServers } = await cfg.json();

  const pc = new RTCPeerConnection({ iceServers });
  call.pc = pc;
  const channel = pc.createDataChannel("events");
  call.channel = channel;
  channel.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { console.warn("bad event", e); } };
  pc.addTransceiver(stream.getAudioTracks()[0], { direction: "sendrecv", streams: [stream] });
  pc.ontrack = (e) => {
    ui.audio.srcObject = e.streams[0] || new MediaStream([e.track]);
    ui.audio.play().catch(() => showError("The browser blocked audio playback: click anywhere on the page."));
  };
  pc.onconnectionstatechange = () => {
    if (!call || call.pc !== pc) return;
    const s = pc.connectionState;
    if (s === "failed") {
      showError("The connection failed (no network path to the server). A TURN server may be needed: see the README.");
      stop();
    } else if (s === "disconnected") {
      setConnection("connection interrupted, trying to recover…");
    } else if (s === "connected") {
      setConnection("connected: speak any time");
    } else if (s === "closed") {
      stop();
    }
  };

  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringDone(pc, 2000);
  const res = await fetch("offer", {
    method: "POST",
    headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
  });
  if (!res.ok) throw new Error(await describe(res));
  await pc.setRemoteDescription(await res.json());
}

async function describe(res) {
  let detail = "";
  try { detail = (await res.json()).detail; } catch (e) { /* not JSON */ }
  if (res.status === 401) return "This server needs a token: open the link with #token=… that its owner gave you.";
  if (res.status === 503) return detail || "The server is busy; try again in a minute.";
  return `The server refused the call (${res.status}): ${detail || res.statusText}`;
}

function stop() {
  const c = call;
  call = null;
  if (c) {
    if (c.channel && c.channel.readyState === "open") c.channel.send(JSON.stringify({ type: "bye" }));
    if (c.pc) c.pc.close();
    c.stream.getTracks().forEach((t) => t.stop());
  }
  ui.audio.srcObject = null;
  ui.toggle.textContent = "Start talking";
  ui.toggle.setAttribute("aria-pressed", "false");
  setConnection("not connected");
  setState("idle");
}

ui.toggle.addEventListener("click", async () => {
  if (call) { stop(); return; }
  ui.toggle.disabled = true;
  ui.toggle.textContent = "Stop";
  ui.toggle.setAttribute("aria-pressed", "true");
  try {
    await start();
  } catch (err) {
    stop();
    showError(err.message || String(err));
  } finally {
    ui.toggle.disabled = false;
  }
});

window.addEventListener("pagehide", stop);

// For tests and the curious: the call's WebRTC numbers.
window.duplex = {
  async stats() {
    if (!call || !call.pc) return null;
    const out = { connection: call.pc.connectionState };
    (await call.pc.getStats()).forEach((r) => {
      if (r.kind !== "audio") return;
      if (r.type === "inbound-rtp") {
        out.inbound = { packetsReceived: r.packetsReceived, bytesReceived: r.bytesReceived,
          totalAudioEnergy: r.totalAudioEnergy, audioLevel: r.audioLevel, codecId: r.codecId,
          // the browser's own jitter buffer: how long the agent's audio waited there, on average
          jitterBufferMs: r.jitterBufferEmittedCount ? 1000 * r.jitterBufferDelay / r.jitterBufferEmittedCount : null };
      } else if (r.type === "outbound-rtp") {
        out.outbound = { packetsSent: r.packetsSent, bytesSent: r.bytesSent };
      }
    });
    return out;
  },
};
