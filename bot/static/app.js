// voxbot in the browser: the microphone goes to /ws as 16-bit PCM in 20 ms messages,
// the bot's 16-bit PCM comes back and plays without gaps. The wire protocol is
// documented in transports/websocket.py.
"use strict";

const ui = {
  state: document.getElementById("state"),
  toggle: document.getElementById("toggle"),
  error: document.getElementById("error"),
  transcript: document.getElementById("transcript"),
};

// Read by tests (and the curious): how much bot audio this page has received.
window.voxbot = { receivedAudioBytes: 0 };

let session = null;
// The server's access token, if it asks for one: from the URL fragment (#token=...), which
// browsers never send to the server or put in its logs, or typed in after a refusal.
let token = new URLSearchParams(location.hash.slice(1)).get("token");
const UNAUTHORIZED = 1008;

ui.toggle.addEventListener("click", () => (session ? stop("idle") : start()));

/** Plays PCM16 chunks back to back on the audio clock: each starts where the last ends. */
class Player {
  constructor(context) {
    this.context = context;
    this.sampleRate = 24000;
    this.next = 0;
    this.sources = new Set();
  }

  play(data) {
    const pcm = new Int16Array(data);
    const buffer = this.context.createBuffer(1, pcm.length, this.sampleRate);
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 0x8000;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    // After a gap, start a little ahead so the next chunk is here before this one ends.
    this.next = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
  }

  /** Stops everything queued at once; says whether anything was still playing. */
  flush() {
    const playing = this.sources.size > 0;
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.next = 0;
    this.resume();
    return playing;
  }

  /** Holds what is queued where it is (the user may be barging in): the audio clock stops. */
  pause() {
    if (this.context.state === "running") this.context.suspend();
  }

  resume() {
    if (this.context.state === "suspended") this.context.resume();
  }
}

function start() {
  showError("");
  setState("connecting");
  ui.toggle.textContent = "Stop";
  ui.toggle.classList.add("stop");
  // Made inside the click, so the browser lets them play sound. Playback has a context of
  // its own, so holding it while the user may be barging in does not stop the microphone.
  const context = new AudioContext();
  const playback = new AudioContext();
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const s = { context, ws, player: new Player(playback), stream: null, botLine: null };
  session = s;

  ws.onopen = () => {
    if (token) ws.send(JSON.stringify({ type: "auth", token }));
    ws.send(JSON.stringify({ type: "start", sample_rate: context.sampleRate }));
  };
  ws.onmessage = (event) => onMessage(s, event.data);
  ws.onerror = () => showError("the connection to the bot failed");
  ws.onclose = (event) => {
    if (session !== s) return;
    stop(ui.error.hidden ? "closed" : "error");
    if (event.code === UNAUTHORIZED && event.reason.startsWith("unauthorized")) {
      token = window.prompt("This bot asks for an access token:") || token;
    }
  };
}

function stop(state) {
  const s = session;
  session = null;
  s.ws.close();
  s.stream?.getTracks().forEach((track) => track.stop());
  s.context.close();
  s.player.context.close();
  setState(state);
  ui.toggle.textContent = "Start";
  ui.toggle.classList.remove("stop");
}

function onMessage(s, data) {
  if (data instanceof ArrayBuffer) {
    window.voxbot.receivedAudioBytes += data.byteLength;
    s.player.play(data);
    return;
  }
  const message = JSON.parse(data);
  switch (message.type) {
    case "ready":
      s.player.sampleRate = message.sample_rate_out;
      startMicrophone(s).then(
        () => session === s && setState("live"),
        (e) => {
          if (session !== s) return;
          showError(`microphone: ${e.message}`);
          stop("error");
        },
      );
      break;
    case "transcript":
      s.botLine = null;
      addLine("user", message.text);
      break;
    case "bot_text":
      if (s.botLine) s.botLine.textContent += ` ${message.text}`;
      else s.botLine = addLine("bot", message.text);
      break;
    case "pause":
      s.player.pause();
      break;
    case "resume":
      s.player.resume();
      break;
    case "interrupt":
      if (s.player.flush() && s.botLine) s.botLine.classList.add("interrupted");
      s.botLine = null;
      break;
    case "error":
      showError(message.message);
      break;
  }
}

async function startMicrophone(s) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  if (session !== s) {
    stream.getTracks().forEach((track) => track.stop());
    return;
  }
  s.stream = stream;
  await s.context.audioWorklet.addModule("static/mic-worklet.js");
  const capture = new AudioWorkletNode(s.context, "pcm-capture", { numberOfOutputs: 0 });
  capture.port.onmessage = (event) => {
    if (s.ws.readyState === WebSocket.OPEN) s.ws.send(event.data);
  };
  s.context.createMediaStreamSource(stream).connect(capture);
}

function addLine(who, text) {
  const line = document.createElement("li");
  line.className = who;
  line.textContent = text;
  ui.transcript.append(line);
  line.scrollIntoView({ block: "nearest" });
  return line;
}

function setState(state) {
  ui.state.textContent = state;
  ui.state.dataset.state = state;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}
