// The playground: plain JavaScript, no framework, no network beyond this service.
// URLs are relative, so the page also works behind a reverse proxy that adds a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  controller: null, // AbortController of the running request
  streamSupported: true, // false once the server said it does not know `stream`
};

// ---- model metadata -------------------------------------------------------------------------

// the generation parameters of the form: their defaults come from /metadata's `sampling` (the
// server's own), and one still unset (metadata not loaded yet) is left out of the request
const SAMPLING_FIELDS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"];

const MODEL_FIELDS = [
  ["model", (m) => m.model_id],
  ["service", (m) => m.service],
  ["preset", (m) => m.preset],
  ["parameters", (m) => (m.parameters == null ? null : m.parameters.toLocaleString("en-US"))],
  ["layers · width · heads", (m) => (m.n_layer == null ? null : `${m.n_layer} · ${m.n_embd} · ${m.n_head}`)],
  ["context", (m) => m.context_length],
  ["vocabulary", (m) => m.vocab_size],
  ["dtype", (m) => m.dtype],
  ["device", (m) => m.device],
  ["trained on", (m) => m.training && m.training.data],
  ["training steps", (m) => m.training && m.training.steps],
  ["val. bits/byte", (m) => m.training && m.training.val_bits_per_byte],
  ["held-out bits/byte", (m) => m.training && m.training.heldout_bits_per_byte &&
    Object.entries(m.training.heldout_bits_per_byte).map(([k, v]) => `${k} ${v}`).join(", ")],
  ["service version", (m) => m.service_version],
];

async function loadMetadata() {
  const info = $("model-info");
  let meta;
  try {
    const r = await fetch("metadata", { headers: { Accept: "application/json" } });
    meta = await r.json();
    if (!r.ok) throw new Error(meta.detail || `HTTP ${r.status}`);
  } catch (err) {
    $("model-status").textContent = `unavailable: ${err.message}`;
    info.dataset.state = "error";
    return;
  }
  info.replaceChildren();
  for (const [label, get] of MODEL_FIELDS) {
    const value = get(meta);
    if (value == null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    if (label === "model") dd.id = "model-id";
    info.append(dt, dd);
  }
  info.dataset.state = "loaded";
  if (meta.warning) {
    $("model-warning").textContent = meta.warning;
    $("model-warning").hidden = false;
  }
  const limit = meta.limits && meta.limits.max_new_tokens;
  if (limit) {
    $("max_new_tokens").max = limit;
    $("min_new_tokens").max = limit;
  }
  showDefaults(meta.sampling || {});
}

// each parameter the user has not set yet takes the server's default
function showDefaults(sampling) {
  for (const id of SAMPLING_FIELDS) {
    const spec = sampling[id];
    if (spec && spec.default != null && !$(id).dataset.set) {
      $(id).value = spec.default;
      $(id).dataset.set = "default";
    }
  }
  showRanges();
}

function showRanges() {
  for (const id of ["temperature", "top_p"]) {
    $(`${id}-value`).textContent = $(id).dataset.set ? $(id).value : "";
  }
}

// ---- the request ----------------------------------------------------------------------------

function requestBody() {
  const num = (id) => Number($(id).value);
  const body = { text: $("prompt").value };
  for (const id of SAMPLING_FIELDS) {
    if ($(id).dataset.set && $(id).value.trim() !== "") body[id] = num(id);
  }
  if ($("seed").value.trim() !== "") body.seed = num("seed");
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  if (stop.length) body.stop = stop;
  return body;
}

function post(body, signal) {
  return fetch("forward", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream, application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

// a 400 that names the `stream` field: this server does not stream (yet)
function rejectsStream(error) {
  return (error.errors || []).some(
    (e) => (e.loc || []).includes("stream") || /\bstream\b/.test(e.msg || ""),
  );
}

async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return { detail: `HTTP ${response.status} ${response.statusText}` };
  }
}

// ---- Server-Sent Events over a fetch body (EventSource cannot POST) -------------------------

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = "message";
  let data = [];

  const dispatch = () => {
    if (data.length) onEvent(event, data.join("\n"));
    event = "message";
    data = [];
  };
  const line = (text) => {
    if (text === "") return dispatch();
    if (text.startsWith(":")) return; // a comment (keep-alive)
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  };

  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    // lines end with \n, \r\n or \r; a trailing \r may be the first half of \r\n: keep it
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const ch = buffer[i];
      if (ch !== "\n" && ch !== "\r") continue;
      if (ch === "\r" && i + 1 === buffer.length) break;
      line(buffer.slice(start, i));
      if (ch === "\r" && buffer[i + 1] === "\n") i++;
      start = i + 1;
    }
    buffer = buffer.slice(start);
  }
  buffer += decoder.decode();
  if (buffer) line(buffer.replace(/\r$/, ""));
  dispatch();
}

// ---- rendering ------------------------------------------------------------------------------

function setStatus(text, stateName) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = stateName;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function showError(error, status) {
  const lines = [error.detail || `HTTP ${status}`];
  for (const e of error.errors || []) lines.push(`${(e.loc || []).join(".")}: ${e.msg}`);
  setStatus(`Error${status ? ` ${status}` : ""}: ${lines.join("; ")}`, "error");
}

function finish(result, startedAt, firstTokenAt) {
  $("output-text").textContent = result.text;
  const seconds = (performance.now() - startedAt) / 1000;
  const usage = result.usage || {};
  const parts = [
    `finish reason: ${result.finish_reason}`,
    `${usage.completion_tokens ?? "?"} tokens in ${seconds.toFixed(2)} s`,
    `prompt ${usage.prompt_tokens ?? "?"} tokens`,
  ];
  if (firstTokenAt) parts.push(`first token after ${Math.round(firstTokenAt - startedAt)} ms`);
  if (result.model) parts.push(`model ${result.model}`);
  setStatus(parts.join(" · "), "done");
}

// ---- generate -------------------------------------------------------------------------------

async function generate(event) {
  if (event) event.preventDefault();
  if (state.controller) return;
  const form = $("form");
  if (!form.reportValidity()) return;

  const body = requestBody();
  let stream = $("stream").checked && state.streamSupported;
  state.controller = new AbortController();
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  $("output-prompt").textContent = body.text;
  $("output-text").textContent = "";
  notice("");
  setStatus("Generating…", "running");
  const startedAt = performance.now();

  try {
    let response = await post(stream ? { ...body, stream: true } : body, state.controller.signal);
    if (stream && response.status === 400) {
      const error = await readJson(response);
      if (!rejectsStream(error)) return showError(error, 400);
      state.streamSupported = false;
      stream = false;
      $("stream").checked = false;
      $("stream").disabled = true;
      notice("This server does not stream yet: showing the whole result when it is ready.");
      response = await post(body, state.controller.signal);
    }
    if (!response.ok) return showError(await readJson(response), response.status);

    const type = response.headers.get("content-type") || "";
    if (!type.startsWith("text/event-stream")) {
      return finish(await response.json(), startedAt, null);
    }
    let firstTokenAt = null;
    let finished = false;
    await readEvents(response, (name, raw) => {
      const payload = JSON.parse(raw);
      if (name === "token") {
        if (firstTokenAt === null) firstTokenAt = performance.now();
        $("output-text").textContent += payload.text;
        setStatus("Generating…", "running");
      } else if (name === "done") {
        finished = true;
        finish(payload, startedAt, firstTokenAt);
      } else if (name === "error") {
        finished = true;
        showError(payload, null);
      }
    });
    if (!finished) setStatus("The stream ended before the result arrived.", "error");
  } catch (err) {
    if (err.name === "AbortError") setStatus("Stopped.", "stopped");
    else setStatus(`Error: ${err.message}`, "error");
  } finally {
    state.controller = null;
    $("generate").disabled = false;
    $("stop-button").disabled = true;
  }
}

function init() {
  $("form").addEventListener("submit", generate);
  $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
  });
  for (const id of SAMPLING_FIELDS) {
    $(id).addEventListener("input", () => {
      $(id).dataset.set = "user";
      showRanges();
    });
  }
  loadMetadata();
}

document.addEventListener("DOMContentLoaded", init);
