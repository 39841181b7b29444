// msnet web page: choose or drop a study, upload it to /v1/predict, show the result (the study
// viewer lives in viewer.js).
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = [];   // File objects to upload
let classes = [];

function fmtSize(bytes) {
  if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(0) + " KiB";
  return (bytes / 1024 / 1024).toFixed(1) + " MiB";
}

function setFiles(files) {
  chosen = Array.from(files).filter((f) => !f.name.startsWith("."));
  const total = chosen.reduce((s, f) => s + f.size, 0);
  if (chosen.length === 0) {
    $("chosen").textContent = "No study chosen.";
  } else if (chosen.length === 1) {
    $("chosen").textContent = `${chosen[0].name} (${fmtSize(total)})`;
  } else {
    $("chosen").textContent = `${chosen.length} files (${fmtSize(total)})`;
  }
  $("analyse").disabled = chosen.length === 0;
  $("error").hidden = true;
}

// Folders dropped from the file manager: walk their entries.
function readEntry(entry) {
  return new Promise((resolve) => {
    if (entry.isFile) {
      entry.file((f) => resolve([f]), () => resolve([]));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      const all = [];
      const next = () => reader.readEntries(async (batch) => {
        if (batch.length === 0) {
          const nested = await Promise.all(all.map(readEntry));
          resolve(nested.flat());
        } else {
          all.push(...batch);
          next();
        }
      }, () => resolve([]));
      next();
    } else {
      resolve([]);
    }
  });
}

async function onDrop(ev) {
  ev.preventDefault();
  $("drop").classList.remove("over");
  const items = ev.dataTransfer.items;
  if (items && items.length && items[0].webkitGetAsEntry) {
    const entries = Array.from(items).map((it) => it.webkitGetAsEntry()).filter(Boolean);
    const files = (await Promise.all(entries.map(readEntry))).flat();
    setFiles(files);
  } else {
    setFiles(ev.dataTransfer.files);
  }
}

function showProgress(fraction, text, busy) {
  $("progress").hidden = false;
  const fill = $("progress-fill");
  fill.classList.toggle("busy", !!busy);
  fill.style.width = busy ? "" : Math.round(fraction * 100) + "%";
  $("progress-text").textContent = text;
}

function showError(text, details) {
  $("progress").hidden = true;
  const box = $("error");
  box.textContent = text;
  if (details) {  // the server's own message, for whoever reports the problem
    const more = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "Details";
    more.append(summary, document.createTextNode(details));
    box.append(more);
  }
  box.hidden = false;
  $("analyse").disabled = chosen.length === 0;
}

function analyse() {
  if (!chosen.length) return;
  const form = new FormData();
  for (const f of chosen) form.append("file", f, f.name);
  const sid = $("study-id").value.trim();
  if (sid) form.append("study_id", sid);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/predict");
  const key = $("api-key").value;
  if (key) xhr.setRequestHeader("X-API-Key", key);
  xhr.responseType = "json";
  xhr.upload.onprogress = (ev) => {
    if (ev.lengthComputable) showProgress(ev.loaded / ev.total, `Uploading… ${Math.round(100 * ev.loaded / ev.total)} %`);
  };
  xhr.upload.onload = () => showProgress(1, "Analysing… (reading the study, scoring every slice)", true);
  xhr.onload = () => {
    const body = xhr.response || {};
    if (xhr.status === 200) {
      $("progress").hidden = true;
      $("analyse").disabled = false;
      render(body, key);
    } else {
      const err = PageErrors.upload(xhr.status, body.detail || xhr.statusText);
      showError(err.text, err.details);
    }
  };
  xhr.onerror = () => showError(PageErrors.upload(0, "").text);
  xhr.ontimeout = () => showError(PageErrors.upload(504, "").text);
  $("analyse").disabled = true;
  $("error").hidden = true;
  $("result").hidden = true;
  Viewer.hide();
  showProgress(0, "Uploading… 0 %");
  xhr.send(form);
}

function render(r, key) {
  const names = classes.length ? classes : Object.keys(r.probabilities);
  $("prediction").textContent = r.prediction;
  $("confidence").textContent = `p = ${(100 * r.probabilities[r.prediction]).toFixed(1)} %`;
  const probs = $("probs");
  probs.replaceChildren();
  names.forEach((c, i) => {
    const p = r.probabilities[c] || 0;
    const name = document.createElement("span");
    name.className = "name" + (c === r.prediction ? " top" : "");
    name.textContent = c;
    const track = document.createElement("div");
    track.className = "track";
    const val = document.createElement("div");
    val.className = `val c${i % 3}`;
    val.style.width = (100 * p).toFixed(1) + "%";
    val.dataset.cls = c;
    track.appendChild(val);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = (100 * p).toFixed(1) + " %";
    probs.append(name, track, pct);
  });
  const warn = $("warnings");
  warn.replaceChildren();
  for (const w of r.warnings || []) {
    const li = document.createElement("li");
    li.textContent = w;
    warn.appendChild(li);
  }
  warn.hidden = !(r.warnings || []).length;
  const images = r.images || {};
  $("key-slices").src = images.key_slices || "";
  $("slice-scores").src = images.slice_scores || "";
  const keys = (r.key_slices || []).map((k) => `${k.slice_index} (${k.score.toFixed(2)})`).join(", ");
  const t = r.timing_s || {};
  $("meta").textContent = `Study ${r.study_id} · ${r.n_slices} slices · key slices: ${keys} · ` +
    `analysed in ${(t.total || 0).toFixed(1)} s`;
  $("result").hidden = false;
  $("static-curve").hidden = Viewer.show(r, key);  // the viewer draws its own, clickable curve
  $("result").dataset.state = "done";
}

async function init() {
  try {
    const res = await fetch("/health");
    const h = await res.json();
    classes = h.classes || [];
    $("model").textContent = `model: ${h.model} · limit ${h.max_upload_mb} MiB`;
    $("takes").textContent = h.takes ? `this model takes ${h.takes}; other input is refused` : "";
    $("key-row").hidden = !h.auth_required;
  } catch (e) {
    $("model").textContent = "model: unavailable";
  }
  $("file").addEventListener("change", (e) => setFiles(e.target.files));
  $("folder").addEventListener("change", (e) => setFiles(e.target.files));
  $("analyse").addEventListener("click", analyse);
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  document.body.dataset.ready = "1";
}

init();
