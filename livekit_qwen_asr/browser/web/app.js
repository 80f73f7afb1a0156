// Caption page: microphone -> WebRTC (one audio track) -> server; captions come back on a data
// channel. Interims are redrawn in place (one element per segment); a final replaces its interim and
// stays as a line. Timings for tests and the docs are kept in window.captionStats.
"use strict";

const stats = (window.captionStats = {
  startedMs: null, micMs: null, connectedMs: null, firstInterimMs: null, firstFinalMs: null,
  interims: 0, finals: 0, segments: 0, call: null, state: "idle", errors: [],
});
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let pc = null, channel = null, mic = null, callId = null, byeWaiter = null;

function setStatus(state, text) {
  stats.state = state;
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function lineFor(msg) {
  const key = msg.call + "/" + msg.segment;
  let el = document.querySelector(`.line[data-key="${CSS.escape(key)}"]`);
  if (!el) {
    el = document.createElement("div");
    el.className = "line";
    el.dataset.key = key;
    el.dataset.call = msg.call;
    const who = document.createElement("span");
    who.className = "speaker";
    who.textContent = msg.speaker + (msg.call === callId ? " (you)" : "");
    who.title = "connection " + msg.call;
    el.append(who, document.createElement("span"));
    el.lastChild.className = "text";
    $("captions").append(el);
    if (msg.call === callId) stats.segments += 1;
  }
  return el;
}

function showCaption(msg) {
  const el = lineFor(msg);
  if (el.classList.contains("final")) return;  // a final is never revised
  const text = el.querySelector(".text");
  el.classList.toggle("mine", msg.call === callId);
  if (msg.final) {
    el.classList.remove("interim");
    el.classList.add("final");
    text.textContent = msg.text;
    if (!msg.text) el.remove();  // a segment closed with nothing said
    if (msg.call === callId) {
      stats.finals += 1;
      if (stats.firstFinalMs === null) stats.firstFinalMs = performance.now();
    }
  } else {
    el.classList.add("interim");
    const stable = msg.stable && msg.text.startsWith(msg.stable) ? msg.stable : "";
    const s = document.createElement("span"), u = document.createElement("span");
    s.className = "stable"; s.textContent = stable;
    u.className = "unstable"; u.textContent = msg.text.slice(stable.length);
    text.replaceChildren(s, u);
    if (msg.call === callId) {
      stats.interims += 1;
      if (stats.firstInterimMs === null) stats.firstInterimMs = performance.now();
    }
  }
  el.scrollIntoView({ block: "nearest" });
}

function onMessage(ev) {
  const msg = JSON.parse(ev.data);
  if (msg.type === "caption") showCaption(msg);
  else if (msg.type === "hello") {
    $("model").textContent = msg.model;
    if (msg.synthetic) {
      $("banner").hidden = false;
      $("banner").textContent = "Synthetic model: random weights with the real Qwen3-ASR layout. " +
        "Its captions are random tokens, not a transcription; the pipeline is real.";
    } else if (msg.test_model) {
      $("banner").hidden = false;
      $("banner").textContent = "Test model: " + msg.test_model + ". It knows only its synthetic " +
        "English domain (espeak-ng voices, a fixed word list); elsewhere its captions mean nothing.";
    }
    setStatus("live", `Live as ${msg.speaker} (connection ${msg.call}).`);
  } else if (msg.type === "error") {
    stats.errors.push(msg.message);
    setStatus("error", msg.message);
  } else if (msg.type === "bye") {
    if (byeWaiter) byeWaiter();
  }
}

function waitIceGathering(conn) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    conn.addEventListener("icegatheringstatechange", () => {
      if (conn.iceGatheringState === "complete") resolve();
    });
  });
}

async function start() {
  $("start").disabled = true;
  stats.startedMs = performance.now();
  setStatus("connecting", "Asking for the microphone…");
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: true },
    });
    stats.micMs = performance.now();
    pc = new RTCPeerConnection({ iceServers: [] });
    channel = pc.createDataChannel("captions");
    channel.onmessage = onMessage;
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendonly" });
    pc.onconnectionstatechange = () => {
      if (pc && pc.connectionState === "connected" && stats.connectedMs === null) stats.connectedMs = performance.now();
      if (pc && pc.connectionState === "failed") setStatus("error", "Connection failed.");
    };
    setStatus("connecting", "Connecting…");
    await pc.setLocalDescription(await pc.createOffer());
    await waitIceGathering(pc);  // the server does not trickle: send every candidate at once
    const res = await fetch("/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", label: $("label").value }),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(answer.error || res.statusText);
    callId = stats.call = answer.call;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    $("stop").disabled = false;
  } catch (err) {
    stats.errors.push(String(err));
    setStatus("error", "Could not start: " + err.message);
    teardown();
    $("start").disabled = false;
  }
}

function teardown() {
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (pc) pc.close();
  pc = channel = mic = null;
  $("stop").disabled = true;
}

// Hang up: the server finishes the utterance and sends its final before "bye"; then close.
async function hangUp() {
  $("stop").disabled = true;
  if (channel && channel.readyState === "open") {
    setStatus("ending", "Finishing the last caption…");
    const bye = new Promise((resolve) => { byeWaiter = resolve; });
    channel.send(JSON.stringify({ type: "hangup" }));
    await Promise.race([bye, new Promise((r) => setTimeout(r, 35000))]);
  }
  teardown();
  callId = null;
  setStatus("idle", "Hung up.");
  $("start").disabled = false;
}

$("controls").addEventListener("submit", (e) => { e.preventDefault(); start(); });
$("stop").addEventListener("click", hangUp);
// Tab closed or reloaded: tell the server now (a beacon survives the page) so it flushes the final
// to the other pages and frees the call; the connection closing would tell it too, only later.
window.addEventListener("pagehide", () => {
  if (callId) navigator.sendBeacon("/hangup", JSON.stringify({ call: callId }));
  teardown();
});
if (params.get("label")) $("label").value = params.get("label");
if (params.get("autostart") === "1") start();
