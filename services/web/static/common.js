"use strict";
// Shared by both pages: emotion colours, fetch with readable errors, DOM helpers, the camera tile.

const EMOTION_COLORS = {
  Angry: "#e5484d", Disgust: "#7c9a2a", Fear: "#8e4ec6", Happy: "#f5b700",
  Sad: "#3b82f6", Surprise: "#12a594", Neutral: "#9ca3af",
};
const EMOTIONS = Object.keys(EMOTION_COLORS);
const SVG_NS = "http://www.w3.org/2000/svg";

function emotionColor(name) { return EMOTION_COLORS[name] || "#cbd5e1"; }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v; else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function getJSON(url, options) {
  const resp = await fetch(url, Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {}));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const why = body && body.errors ? body.errors.join("\n") : `${resp.status} ${resp.statusText}`;
    const err = new Error(why);
    err.status = resp.status;
    throw err;
  }
  return body;
}

function showBanner(message) {
  const b = document.getElementById("banner");
  if (!b) return;
  b.textContent = message || "";
  b.classList.toggle("show", Boolean(message));
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

// Masks and zones: a polygon whose every coordinate lies in 0..1 is in fractions of the frame
// (as the services read it), any other in frame pixels.
function polygonPixels(points, width, height) {
  const fractions = points.every((p) => p.every((v) => v >= 0 && v <= 1));
  return fractions ? points.map(([x, y]) => [x * width, y * height]) : points.map(([x, y]) => [x, y]);
}

const ZONE_COLORS = ["#58a6ff", "#3fb950", "#d29922", "#db61a2", "#a371f7", "#39c5cf", "#f0883e", "#8b949e"];

// SVG shapes of a camera's mask (dark, hatched) and zones (outlined, named) over a frame.
function geometryShapes(geometry, width, height) {
  const scale = Math.max(1, width / 640);
  const shapes = [];
  (geometry.mask || []).forEach((points, i) => {
    if (!points || points.length < 2) return;
    const px = polygonPixels(points, width, height);
    shapes.push(svgEl("polygon", { class: "mask-area", "data-index": String(i),
      points: px.map((p) => p.join(",")).join(" "), "stroke-width": 2 * scale }));
  });
  (geometry.zones || []).forEach((zone, i) => {
    if (!zone || !zone.points || zone.points.length < 2) return;
    const px = polygonPixels(zone.points, width, height);
    const color = ZONE_COLORS[i % ZONE_COLORS.length];
    const g = svgEl("g", { class: "zone", "data-zone": zone.name || "" });
    g.append(svgEl("polygon", { class: "zone-area", points: px.map((p) => p.join(",")).join(" "), stroke: color,
      fill: color, "stroke-width": 2 * scale }));
    const top = px.reduce((a, p) => (p[1] < a[1] ? p : a), px[0]);
    g.append(svgEl("text", { class: "zone-label", x: top[0] + 4 * scale, y: top[1] + 16 * scale, fill: color,
      "font-size": 14 * scale }, zone.name || "?"));
    shapes.push(g);
  });
  return shapes;
}

function stateClass(state) { return String(state || "unknown").replace(/\s+/g, "-"); }

// One camera: the newest classified frame with its faces drawn over it, refreshed while on screen.
class CameraTile {
  constructor(cam, fps) {
    this.id = cam.id;
    this.period = 1000 / fps;
    this.frameId = null;
    this.visible = false;
    this.stopped = false;
    this.badge = el("span", { class: "badge" });
    this.img = el("img", { alt: `camera ${cam.id}` });
    this.overlay = svgEl("svg", { class: "overlay", preserveAspectRatio: "xMidYMid meet", viewBox: "0 0 640 480" });
    this.empty = el("div", { class: "empty", text: "waiting for frames" });
    this.meta = el("div", { class: "meta" });
    const link = el("a", { href: `/cameras/${encodeURIComponent(cam.id)}`, class: "name", text: cam.id });
    this.root = el("div", { class: "tile", "data-camera": cam.id },
      el("header", {}, link, this.badge),
      el("div", { class: "frame" }, this.img, this.overlay, this.empty),
      this.meta);
    this.update(cam);
  }

  update(cam) {
    this.geometry = { mask: cam.mask || [], zones: cam.zones || [] };
    if (this.shown) this.draw(this.shown.frame, this.shown.faces); // an edited mask or zone shows at once
    this.badge.textContent = cam.state;
    this.badge.className = `badge ${stateClass(cam.state)}`;
    this.root.dataset.state = cam.state;
    const parts = [];
    if (cam.measured_fps !== null && cam.measured_fps !== undefined) parts.push(el("span", { text: `${cam.measured_fps} fps` }));
    else if (cam.fps) parts.push(el("span", { text: `target ${cam.fps} fps` }));
    if (cam.last_frame_age_s !== null && cam.last_frame_age_s !== undefined) {
      parts.push(el("span", { text: `last frame ${Number(cam.last_frame_age_s).toFixed(1)} s ago` }));
    }
    if (cam.owner) parts.push(el("span", { text: `on ${cam.owner}` }));
    if (cam.last_error) parts.push(el("span", { class: "error", text: cam.last_error }));
    this.meta.replaceChildren(...parts);
  }

  start() {
    this.observer = new IntersectionObserver((entries) => {
      for (const e of entries) this.visible = e.isIntersecting;
    });
    this.observer.observe(this.root);
    this.loop();
  }

  stop() {
    this.stopped = true;
    if (this.observer) this.observer.disconnect();
  }

  async loop() {
    while (!this.stopped) {
      const began = performance.now();
      if (this.visible && !document.hidden) {
        try { await this.refresh(); } catch (e) { this.empty.textContent = `cannot load frame: ${e.message}`; this.empty.style.display = ""; }
      }
      const wait = Math.max(100, this.period - (performance.now() - began));
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  async refresh() {
    const data = await getJSON(`/api/cameras/${encodeURIComponent(this.id)}/latest`);
    if (!data.frame) {
      this.empty.textContent = "no frames yet";
      this.empty.style.display = "";
      this.overlay.replaceChildren();
      return;
    }
    if (data.frame.id !== this.frameId) {
      const url = `/api/cameras/${encodeURIComponent(this.id)}/frames/${data.frame.id}.jpg`;
      await loadImage(this.img, url);
      this.frameId = data.frame.id;
    }
    this.empty.style.display = "none";
    this.draw(data.frame, data.faces);
  }

  draw(frame, faces) {
    this.shown = { frame, faces };
    this.overlay.setAttribute("viewBox", `0 0 ${frame.width} ${frame.height}`);
    this.root.querySelector(".frame").style.aspectRatio = `${frame.width} / ${frame.height}`;
    const scale = Math.max(1, frame.width / 640);
    const shapes = faces.map((f) => {
      const [x, y, w, h] = f.box;
      const color = emotionColor(f.emotion);
      const track = f.track_id === null ? "" : `#${f.track_id} `;
      const g = svgEl("g", { class: "face", "data-label": f.emotion, "data-raw-label": f.label,
        "data-track": f.track_id === null ? "" : String(f.track_id), "data-zones": (f.zones || []).join(" ") });
      g.append(svgEl("rect", { class: "face-box", x, y, width: w, height: h, stroke: color }));
      g.append(svgEl("text", { class: "face-label", x, y: Math.max(16 * scale, y - 6), fill: color,
        "font-size": 16 * scale }, `${track}${f.emotion} ${f.score.toFixed(2)}`));
      return g;
    });
    this.overlay.replaceChildren(...geometryShapes(this.geometry || {}, frame.width, frame.height), ...shapes);
  }
}

function loadImage(img, url) {
  return new Promise((resolve, reject) => {
    const probe = new Image();
    probe.onload = () => { img.src = url; resolve(); };
    probe.onerror = () => reject(new Error("frame image failed to load"));
    probe.src = url;
  });
}
