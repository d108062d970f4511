// The upload page: each chosen or dropped image is posted to /v1/jobs, followed through its Server-Sent Events
// (read with fetch, so that a bearer token can go with them), and shown with a before/after slider and a download
// button, or with the reason it failed. No library, nothing from a CDN: this file is all of it.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const TYPES = { "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/tiff": ".tif",
                "image/bmp": ".bmp", "image/gif": ".gif" };
let scale = 0;

function headers() {
  const token = sessionStorage.getItem("superres-token") || "";
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function askForToken() {
  const box = $("#token-box");
  box.hidden = false;
  $("#token").focus();
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) askForToken();
  return response;
}

async function reasonOf(response) {
  try {
    const doc = await response.json();
    if (doc.message) return doc.stage ? `${doc.message} (${doc.stage}: ${doc.error})` : doc.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModels() {
  const select = $("#model");
  const response = await api("v1/models");
  if (!response.ok) {
    $("#served").textContent = response.status === 401 ? "This server wants an API token." : await reasonOf(response);
    return;
  }
  const doc = await response.json();
  scale = doc.scale;
  select.replaceChildren();
  for (const model of doc.models) {
    const option = new Option(`${model.name} (x${model.scale})${model.served ? "" : " - not loaded"}`, model.name);
    option.disabled = !model.served;
    option.selected = model.served;
    select.add(option);
  }
  $("#served").textContent = `${doc.model} on ${doc.engine} (${doc.device})`;
  $("#model-note").textContent = doc.models.length > 1
    ? `This server has one model loaded; start it with --model NAME for another (${doc.models.length} present).`
    : "";
}

function jobCard(file) {
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  $(".job-name", card).textContent = file.name;
  $("#jobs").prepend(card);
  const set = (status, fraction) => {
    $(".job-status", card).textContent = status;
    if (fraction !== undefined) $(".job-progress", card).value = fraction;
  };
  const fail = (message) => {
    set("failed", 0);
    card.classList.add("failed");
    $(".job-progress", card).hidden = true;
    const error = $(".job-error", card);
    error.textContent = message;
    error.hidden = false;
  };
  return { card, set, fail };
}

function query() {
  const params = new URLSearchParams();
  if ($("#format").value) params.set("format", $("#format").value);
  if ($("#quality").value) params.set("quality", $("#quality").value);
  const text = params.toString();
  return text ? `?${text}` : "";
}

// Server-Sent Events through fetch: yields {event, data} until the stream ends
async function* events(url) {
  const response = await api(url, { headers: { Accept: "text/event-stream" } });
  if (!response.ok || !response.body) throw new Error(await reasonOf(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

function resultName(file, contentType) {
  const dot = file.name.lastIndexOf(".");
  const stem = dot > 0 ? file.name.slice(0, dot) : file.name;
  return `${stem}_x${scale}${TYPES[contentType] || ""}`;
}

async function showResult(job, file, ui) {
  const response = await api(job.result_url);
  if (!response.ok) { ui.fail(await reasonOf(response)); return; }
  const blob = await response.blob();
  const after = URL.createObjectURL(blob);
  const before = URL.createObjectURL(file);
  const { card } = ui;
  $(".after", card).src = after;
  $(".before", card).src = before;
  const download = $(".download", card);
  download.href = after;
  download.download = resultName(file, blob.type);
  download.textContent = `Download ${download.download}`;
  const slider = $(".slider", card);
  const frame = $(".compare-frame", card);
  const move = () => {
    $(".before", card).style.clipPath = `inset(0 ${100 - slider.value}% 0 0)`;
    $(".divider", card).style.left = `${slider.value}%`;
  };
  slider.addEventListener("input", move);
  move();
  // dragging on the picture moves the divider too
  frame.addEventListener("pointermove", (e) => {
    if (e.buttons !== 1) return;
    const box = frame.getBoundingClientRect();
    slider.value = Math.round(100 * Math.min(1, Math.max(0, (e.clientX - box.left) / box.width)));
    move();
  });
  $(".compare", card).hidden = false;
  $(".job-progress", card).hidden = true;
  ui.set(`done${job.from_ledger ? " (already done)" : ""}`, 1);
  card.classList.add("done");
}

async function upscale(file) {
  const ui = jobCard(file);
  ui.set("uploading", 0);
  const body = new FormData();
  body.append("image", file, file.name);
  let response;
  try {
    response = await api(`v1/jobs${query()}`, { method: "POST", body });
  } catch (error) {
    ui.fail(`the upload failed: ${error.message}`);
    return;
  }
  if (response.status !== 202 && response.status !== 200) { ui.fail(await reasonOf(response)); return; }
  let job = await response.json();
  ui.card.dataset.job = job.id;
  try {
    if (job.status !== "done" && job.status !== "failed") {
      for await (const { event, data } of events(job.events_url)) {
        job = { ...job, ...data };
        if (event === "progress" || event === "status") {
          const p = data.progress || {};
          const fraction = p.tiles_total ? p.tiles_done / p.tiles_total : 0;
          ui.set(p.tiles_total ? `${data.status}: tile ${p.tiles_done} of ${p.tiles_total}` : data.status, fraction);
        }
        if (event === "done" || event === "failed") break;
      }
    }
  } catch (error) {
    ui.fail(`lost the job's events: ${error.message}`);
    return;
  }
  if (job.status === "done") await showResult(job, file, ui);
  else ui.fail(job.reason ? `${job.reason.message} (${job.reason.stage}: ${job.reason.error})` : `job ${job.status}`);
}

function take(files) {
  for (const file of files) upscale(file);
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("#drop"), input = $("#files");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  input.addEventListener("change", () => { take(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    take(e.dataTransfer.files);
  });
  $("#token").addEventListener("change", (e) => {
    sessionStorage.setItem("superres-token", e.target.value);
    loadModels();
  });
  loadModels();
});
