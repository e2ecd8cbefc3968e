"use strict";
// Web chat for blipkit serve: pick or drop an image, ask, and watch the answer stream in.

const MAX_SIDE = 1024; // images are downscaled in the browser before upload
const $ = (id) => document.getElementById(id);
const state = { image: null, turns: [], busy: false };

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  li.textContent = text;
  $("log").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setBusy(busy) {
  state.busy = busy;
  const ready = state.image !== null && !busy;
  $("question").disabled = state.image === null;
  $("send").disabled = !ready;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot read this file as an image"));
    img.src = src;
  });
}

async function shrink(dataURL) {
  const img = await loadImage(dataURL);
  const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  if (scale === 1) return dataURL;
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.92);
}

async function useFile(file) {
  if (!file) return;
  try {
    state.image = await shrink(await readAsDataURL(file));
  } catch (err) {
    addMessage("error", `Cannot use ${file.name}: ${err.message}`);
    return;
  }
  state.turns = [];
  $("log").replaceChildren();
  $("preview").src = state.image;
  $("preview").hidden = false;
  $("drop-hint").textContent = file.name;
  $("drop-zone").classList.add("has-image");
  $("new-image").hidden = false;
  setBusy(false);
  $("question").focus();
}

function buildMessages(question) {
  const messages = [];
  state.turns.forEach(([q, a], i) => {
    messages.push(userMessage(q, i === 0));
    messages.push({ role: "assistant", content: a });
  });
  messages.push(userMessage(question, state.turns.length === 0));
  return messages;
}

function userMessage(text, withImage) {
  const content = [{ type: "text", text }];
  if (withImage) content.unshift({ type: "image_url", image_url: { url: state.image } });
  return { role: "user", content };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || localStorage.getItem("blipkit-api-key");
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// Reads server-sent events from a fetch response, calling onData with each "data:" payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data:")) onData(line.slice(5).trim());
      }
    }
  }
}

async function ask(question) {
  addMessage("user", question);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  setBusy(true);
  const body = {
    messages: buildMessages(question),
    stream: true,
    max_tokens: Number($("max-tokens").value) || 30,
    temperature: Number($("temperature").value) || 0,
  };
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      if (response.status === 401) $("settings").open = true;
      throw new Error(err.error ? err.error.message : `HTTP ${response.status}`);
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices[0].delta.content;
      if (delta) {
        answer += delta;
        bubble.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
    });
    state.turns.push([question, answer]);
    if (!answer) bubble.textContent = "(empty answer)";
    bubble.dataset.state = "done";
  } catch (err) {
    bubble.className = "msg error";
    bubble.textContent = `Error: ${err.message}`;
    bubble.dataset.state = "error";
  } finally {
    setBusy(false);
  }
}

function init() {
  $("file-input").addEventListener("change", (e) => useFile(e.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    useFile(e.dataTransfer.files[0]);
  });
  $("new-image").addEventListener("click", () => $("file-input").click());
  $("api-key").addEventListener("change", (e) => localStorage.setItem("blipkit-api-key", e.target.value.trim()));
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $("question").value.trim();
    if (!question || state.busy || !state.image) return;
    $("question").value = "";
    ask(question);
  });
  fetch("/v1/models", { headers: headers() })
    .then((r) => (r.ok ? r.json() : null))
    .then((j) => { if (j && j.data.length) $("model-name").textContent = j.data[0].id; })
    .catch(() => {});
  setBusy(false);
}

init();
