// msnet study viewer: scroll every slice of a diagnosed study through window presets or a free
// window/level (drag), zoom and pan, lay the Grad-CAM of the predicted class over any slice, jump from
// the slider's key-slice marks or the slice-score curve. Slices come from the server as windowed PNGs
// (never HU), one request per slice and window, fetched around the current slice first; Grad-CAM maps
// are computed on demand. Slices are numbered by their index, 0 = the most superior (as in the JSON,
// the key-slice strip and the SR).
"use strict";

const Viewer = (() => {
  const $ = (id) => document.getElementById(id);
  const PREFETCH = 4;      // slice requests in flight while preloading a window
  const BITMAPS = 32;      // decoded images kept (the PNGs themselves are all kept)
  const CAM_DELAY_MS = 150; // ask for a Grad-CAM only once scrolling rests on a slice
  const WL_EVERY_MS = 90;   // at most one free-window request per this while dragging
  const HU_PER_PX = 4;      // window/level change per screen pixel dragged
  const ZOOM_MAX = 8;
  let S = null;            // the study on show
  let wheelAcc = 0;

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function fetchBlob(path) {
    const res = await fetch(`/v1/studies/${encodeURIComponent(S.token)}/${path}`,
                            { headers: S.key ? { "X-API-Key": S.key } : {} });
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      const err = new Error(detail);
      err.status = res.status;
      throw err;
    }
    return res.blob();
  }

  function cached(map, key, path) {   // one request per key; a failed one may be retried
    let p = map.get(key);
    if (!p) {
      p = fetchBlob(path);
      map.set(key, p);
      p.catch(() => { if (map.get(key) === p) map.delete(key); });
    }
    return p;
  }
  // a window key: a preset's name, or "custom:LEVEL:WIDTH" (HU, whole numbers)
  const winKey = () => (S.window === "custom" ? `custom:${Math.round(S.level)}:${Math.round(S.width)}` : S.window);
  const tilePath = (wk, i) => {
    if (!wk.startsWith("custom:")) return `slices/${i}.png?window=${wk}`;
    const [, level, width] = wk.split(":");
    return `slices/${i}.png?level=${level}&width=${width}`;
  };
  const tile = (wk, i) => cached(S.tiles, `${wk}:${i}`, tilePath(wk, i));
  const cam = (i) => cached(S.cams, i, `cam/${i}.png`);

  async function bitmap(key, blobPromise) {
    const have = S.bitmaps.get(key);
    if (have) {
      S.bitmaps.delete(key);
      S.bitmaps.set(key, have);
      return have;
    }
    const bmp = await createImageBitmap(await blobPromise);
    S.bitmaps.set(key, bmp);
    while (S.bitmaps.size > BITMAPS) S.bitmaps.delete(S.bitmaps.keys().next().value);
    return bmp;
  }

  function status(text) { $("stage-status").textContent = text; $("stage-status").hidden = !text; }

  function fail(err) {
    const box = $("viewer-error");
    box.textContent = PageErrors.viewer(err.status, err.message);
    box.hidden = false;
    status("");
  }

  function paint(bmp, camBmp, win, i) {
    const ctx = S.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, S.w, S.h);
    // zoom about the image centre, then pan (canvas pixels)
    ctx.setTransform(S.zoom, 0, 0, S.zoom, S.panX + (1 - S.zoom) * S.w / 2, S.panY + (1 - S.zoom) * S.h / 2);
    ctx.drawImage(bmp, 0, 0, S.w, S.h);
    if (camBmp) {
      ctx.globalAlpha = S.opacity;
      ctx.drawImage(camBmp, 0, 0, S.w, S.h);
      ctx.globalAlpha = 1;
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    S.last = { bmp, camBmp, win, i };
    $("slice-canvas").dataset.drawn = `${win}:${i}:${camBmp ? 1 : 0}`;
    $("viewer-error").hidden = true;
  }

  async function draw() {
    const st = S, gen = ++st.gen;
    const stale = () => S !== st || gen !== st.gen;   // another slice, window or study since
    const i = st.index, win = st.window, wk = winKey(), withCam = st.camOn;
    try {
      const camKnown = withCam && st.cams.has(i);
      const [bmp, camBmp] = await Promise.all([
        bitmap(`${wk}:${i}`, tile(wk, i)), camKnown ? bitmap(`cam:${i}`, cam(i)) : null]);
      if (stale()) return;
      paint(bmp, camBmp, win, i);
      if (!withCam || camBmp) { status(""); return; }
      await sleep(CAM_DELAY_MS);
      if (stale()) return;
      status("computing Grad-CAM…");
      const late = await bitmap(`cam:${i}`, cam(i));
      if (stale()) return;
      paint(bmp, late, win, i);
      status("");
    } catch (err) {
      if (!stale()) fail(err);
    }
  }

  function prefetch() {   // every slice of the current preset window, nearest first
    const st = S, gen = ++st.prefetchGen;
    const win = st.window, from = st.index;
    if (win === "custom") return;   // a free window: slices are fetched as they are shown
    const order = [...Array(st.n).keys()].sort((a, b) => Math.abs(a - from) - Math.abs(b - from));
    let next = 0;
    const worker = async () => {
      while (next < order.length && S === st && gen === st.prefetchGen) {
        try { await tile(win, order[next++]); } catch (err) { if (err.status === 404) return; }
      }
    };
    for (let k = 0; k < PREFETCH; k++) worker();
  }

  function info() {
    const i = S.index;
    const parts = [`slice ${i} of 0–${S.n - 1} (0 = head)`];   // the slice index of the JSON, strip and SR
    parts.push(S.z ? `z ${S.z[i].toFixed(1)} mm` : "z —");
    parts.push(`score ${S.scores[i].toFixed(2)}`);
    const rank = S.keys.indexOf(i);
    if (rank >= 0) parts.push(`key slice #${rank + 1}`);
    if (S.window === "custom") parts.push(`W ${Math.round(S.width)} L ${Math.round(S.level)}`);
    if (S.zoom > 1.001) parts.push(`zoom ${S.zoom.toFixed(1)}×`);
    $("slice-info").textContent = parts.join(" · ");
    $("stage").dataset.index = String(i);
    $("slice-slider").value = String(i);
    for (const m of $("key-marks").children) m.classList.toggle("here", Number(m.dataset.index) === i);
    curve();
  }

  function go(i) {
    if (!S) return;
    const j = Math.max(0, Math.min(S.n - 1, Math.round(i)));
    if (j === S.index && S.shown) return;
    S.index = j;
    S.shown = true;
    info();
    draw();
  }

  function curve() {
    const cv = $("score-curve");
    const dpr = window.devicePixelRatio || 1;
    const cssW = cv.clientWidth || 600, cssH = 110;
    if (cv.width !== Math.round(cssW * dpr)) { cv.width = Math.round(cssW * dpr); cv.height = Math.round(cssH * dpr); }
    const ctx = cv.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const top = 8, bottom = cssH - 18, n = S.n;
    const x = (i) => ((i + 0.5) / n) * cssW;
    const y = (s) => bottom - s * (bottom - top);
    ctx.fillStyle = "#dbe7fb";
    ctx.strokeStyle = "#1f6feb";
    ctx.beginPath();
    ctx.moveTo(0, bottom);
    S.scores.forEach((s, i) => { ctx.lineTo((i / n) * cssW, y(s)); ctx.lineTo(((i + 1) / n) * cssW, y(s)); });
    ctx.lineTo(cssW, bottom);
    ctx.closePath();
    ctx.fill();
    ctx.stroke();
    // key slices: a dot and its rank; ranks that would overlap are stacked upwards
    ctx.font = "bold 11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    const placed = [];
    S.keys.map((k, rank) => ({ k, rank })).sort((a, b) => a.k - b.k).forEach(({ k, rank }) => {
      const px = x(k), py = y(S.scores[k]);
      ctx.fillStyle = "#d1495b";
      ctx.strokeStyle = "#fff";
      ctx.beginPath(); ctx.arc(px, py, 4.5, 0, 2 * Math.PI); ctx.fill(); ctx.stroke();
      let ly = Math.max(py - 6, top + 11);
      while (placed.some((q) => Math.abs(q.x - px) < 12 && Math.abs(q.y - ly) < 11)) ly += ly - 11 > top ? -11 : 11;
      placed.push({ x: px, y: ly });
      ctx.fillStyle = "#8f1d2c";
      ctx.fillText(String(rank + 1), px, ly);
    });
    ctx.strokeStyle = "#1f6feb";
    ctx.strokeStyle = "#1d2630";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(x(S.index), top - 4);
    ctx.lineTo(x(S.index), bottom);
    ctx.stroke();
    ctx.lineWidth = 1;
    ctx.fillStyle = "#5d6b78";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "bottom";
    ctx.textAlign = "left";
    ctx.fillText(`head · score for ${S.camClass}`, 2, cssH - 2);
    ctx.textAlign = "right";
    ctx.fillText("feet", cssW - 2, cssH - 2);
  }

  function curveIndex(ev) {
    const r = $("score-curve").getBoundingClientRect();
    return Math.floor(((ev.clientX - r.left) / r.width) * S.n);
  }

  function setWindow(win) {
    if (!S || !S.windows.includes(win)) return;
    S.window = win;
    if (S.presets[win]) [S.level, S.width] = S.presets[win];
    for (const b of $("windows").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.window === win));
    draw();
    prefetch();
  }

  function marks() {
    const box = $("key-marks");
    box.replaceChildren();
    S.keys.forEach((k, rank) => {
      const m = document.createElement("button");
      m.type = "button";
      m.className = "mark";
      m.dataset.index = String(k);
      m.style.setProperty("--f", S.n > 1 ? String(k / (S.n - 1)) : "0");
      m.title = `key slice #${rank + 1}: slice ${k}, score ${S.scores[k].toFixed(2)}`;
      m.setAttribute("aria-label", m.title);
      m.addEventListener("click", () => go(k));
      box.appendChild(m);
    });
  }

  function nextKey(dir) {
    if (!S.keys.length) return;
    const sorted = [...S.keys].sort((a, b) => a - b);
    const after = dir > 0 ? sorted.find((k) => k > S.index) : [...sorted].reverse().find((k) => k < S.index);
    go(after !== undefined ? after : (dir > 0 ? sorted[0] : sorted[sorted.length - 1]));
  }

  function onKey(ev) {
    if (!S || $("viewer").hidden || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const t = ev.target;
    const inViewer = t === document.body || $("viewer").contains(t);
    if (!inViewer || (t.tagName === "INPUT" && t.type !== "checkbox")) return;
    const steps = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
    if (ev.key in steps) go(S.index + steps[ev.key]);
    else if (ev.key === "Home") go(0);
    else if (ev.key === "End") go(S.n - 1);
    else if (ev.key === "k" || ev.key === "K") nextKey(ev.shiftKey ? -1 : 1);
    else if (ev.key === "+" || ev.key === "=") zoomBy(1.25);
    else if (ev.key === "-" || ev.key === "_") zoomBy(0.8);
    else if (ev.key === "0" || ev.key === "r" || ev.key === "R") resetView();
    else if (ev.key === "l" || ev.key === "L") setWindow("lung");
    else if (ev.key === "m" || ev.key === "M") setWindow("mediastinum");
    else if (ev.key === "?" || ev.key === "h" || ev.key === "H") toggleHelp();
    else if (ev.key === "Escape" && !$("viewer-help").hidden) toggleHelp();
    else return;
    ev.preventDefault();
  }

  function repaint() {   // the same images again, with the new zoom/pan (no request)
    if (S && S.last) paint(S.last.bmp, S.last.camBmp, S.last.win, S.last.i);
    if (S) info();
  }

  function zoomBy(f) {
    S.zoom = Math.max(1, Math.min(ZOOM_MAX, S.zoom * f));
    if (S.zoom === 1) { S.panX = 0; S.panY = 0; }
    repaint();
  }

  function resetView() {
    S.zoom = 1; S.panX = 0; S.panY = 0;
    if (S.window === "custom") setWindow(S.windows.includes("lung") ? "lung" : S.windows[0]);
    repaint();
  }

  function toggleHelp() {
    const box = $("viewer-help");
    box.hidden = !box.hidden;
    $("help-button").setAttribute("aria-expanded", String(!box.hidden));
  }

  // dragging on the image: window/level (left button, HU studies) or pan (shift, middle button, or a
  // grey-level study); a click without a move changes nothing
  let drag = null, wlTimer = 0;
  function onPointerDown(ev) {
    if (!S) return;
    $("stage").focus();
    const pan = ev.shiftKey || ev.button === 1 || !Object.keys(S.presets).length;
    if (ev.button !== 0 && ev.button !== 1) return;
    drag = { x: ev.clientX, y: ev.clientY, pan, moved: false, level: S.level, width: S.width, panX: S.panX, panY: S.panY };
    $("stage").setPointerCapture(ev.pointerId);
    ev.preventDefault();
  }
  function onPointerMove(ev) {
    if (!S || !drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 3) return;
    drag.moved = true;
    if (drag.pan) {
      const scale = S.w / $("slice-canvas").getBoundingClientRect().width;
      S.panX = drag.panX + dx * scale;
      S.panY = drag.panY + dy * scale;
      repaint();
      return;
    }
    S.width = Math.max(1, Math.min(4000, drag.width + dx * HU_PER_PX));
    S.level = Math.max(-1500, Math.min(3000, drag.level - dy * HU_PER_PX));
    if (S.window !== "custom") {
      S.window = "custom";
      for (const b of $("windows").querySelectorAll("button")) b.setAttribute("aria-pressed", "false");
    }
    info();
    if (!wlTimer) wlTimer = setTimeout(() => { wlTimer = 0; draw(); }, WL_EVERY_MS);
  }
  function onPointerUp() {
    if (drag && drag.moved && !drag.pan) draw();
    drag = null;
  }

  function onWheel(ev) {
    if (!S) return;
    ev.preventDefault();
    if (ev.ctrlKey || ev.metaKey) { zoomBy(ev.deltaY < 0 ? 1.15 : 1 / 1.15); return; }
    wheelAcc += ev.deltaMode === 1 ? ev.deltaY * 16 : ev.deltaY;   // lines -> pixels
    if (Math.abs(wheelAcc) >= 25) {
      go(S.index + Math.sign(wheelAcc));
      wheelAcc = 0;
    }
  }

  function init() {
    $("stage").addEventListener("wheel", onWheel, { passive: false });
    $("stage").addEventListener("pointerdown", onPointerDown);
    $("stage").addEventListener("pointermove", onPointerMove);
    $("stage").addEventListener("pointerup", onPointerUp);
    $("stage").addEventListener("pointercancel", onPointerUp);
    $("stage").addEventListener("dblclick", () => { if (S) resetView(); });
    $("help-button").addEventListener("click", toggleHelp);
    document.addEventListener("keydown", onKey);
    $("slice-slider").addEventListener("input", (e) => go(Number(e.target.value)));
    for (const b of $("windows").querySelectorAll("button")) b.addEventListener("click", () => setWindow(b.dataset.window));
    $("cam-on").addEventListener("change", (e) => { if (S) { S.camOn = e.target.checked; draw(); } });
    $("cam-opacity").addEventListener("input", (e) => { if (S) { S.opacity = Number(e.target.value) / 100; draw(); } });
    const cv = $("score-curve");
    let dragging = false;
    cv.addEventListener("pointerdown", (e) => { if (S) { dragging = true; cv.setPointerCapture(e.pointerId); go(curveIndex(e)); } });
    cv.addEventListener("pointermove", (e) => { if (S && dragging) go(curveIndex(e)); });
    cv.addEventListener("pointerup", () => { dragging = false; });
    window.addEventListener("resize", () => { if (S && !$("viewer").hidden) curve(); });
    $("stage").addEventListener("contextmenu", (e) => e.preventDefault());
  }

  function hide() {
    S = null;
    $("viewer").hidden = true;
    $("viewer-off").hidden = true;
    $("viewer-error").hidden = true;
  }

  // r: the /v1/predict answer; key: the API key the page sent, if any
  function show(r, key) {
    hide();
    const v = r.viewer;
    if (!v) { $("viewer-off").hidden = false; return false; }
    const keys = (r.key_slices || []).map((k) => k.slice_index);
    S = {
      token: v.token, key, n: v.n_slices, w: v.width, h: v.height, z: v.z_mm, windows: v.windows,
      camClass: v.cam_class, scores: r.slice_scores, keys, index: keys.length ? keys[0] : 0, shown: false,
      window: v.windows.includes("lung") ? "lung" : v.windows[0], camOn: $("cam-on").checked,
      opacity: Number($("cam-opacity").value) / 100, tiles: new Map(), cams: new Map(), bitmaps: new Map(),
      gen: 0, prefetchGen: 0, presets: v.presets || {}, zoom: 1, panX: 0, panY: 0, last: null,
    };
    [S.level, S.width] = S.presets[S.window] || [-600, 1500];
    // orientation: slices are shown as read, patient right on the image's left (radiological view);
    // grey-level images carry no orientation, so they get no markers
    $("orientation").hidden = !v.z_mm;
    const canvas = $("slice-canvas");
    canvas.width = v.width;
    canvas.height = v.height;
    delete canvas.dataset.drawn;
    const [rowMm, colMm] = v.pixel_spacing_mm;
    canvas.style.aspectRatio = `${v.width * (colMm || 1)} / ${v.height * (rowMm || 1)}`;
    S.ctx = canvas.getContext("2d");
    for (const b of $("windows").querySelectorAll("button")) {
      b.hidden = !v.windows.includes(b.dataset.window);
      b.setAttribute("aria-pressed", String(b.dataset.window === S.window));
    }
    $("cam-class").textContent = v.cam_class;
    const slider = $("slice-slider");
    slider.max = String(v.n_slices - 1);
    $("viewer").hidden = false;
    marks();
    S.index = 0;
    go(keys.length ? keys[0] : 0);   // open on the first key slice
    prefetch();
    return true;
  }

  return { init, show, hide, go };
})();

Viewer.init();
