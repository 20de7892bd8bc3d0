"use strict";
// One camera: live frame with faces, emotion mix of the last minute, tracks with timelines, a plot.

const cameraId = decodeURIComponent(location.pathname.split("/").pop());

function drawMix(mix) {
  const total = Object.values(mix).reduce((a, b) => a + b, 0);
  const width = 320, row = 22;
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${row * EMOTIONS.length}`, role: "img", "aria-label": "emotion mix" });
  EMOTIONS.forEach((name, i) => {
    const n = mix[name] || 0;
    const frac = total ? n / total : 0;
    const y = i * row;
    svg.append(svgEl("text", { x: 0, y: y + 15, fill: "#e6edf3", "font-size": 12 }, name));
    svg.append(svgEl("rect", { x: 70, y: y + 4, width: 200, height: 14, fill: "#0b0f14" }));
    svg.append(svgEl("rect", { class: "mix-bar", "data-emotion": name, x: 70, y: y + 4, width: 200 * frac, height: 14,
      fill: emotionColor(name) }));
    svg.append(svgEl("text", { x: 276, y: y + 15, fill: "#8b98a7", "font-size": 12 },
      total ? `${Math.round(100 * frac)}%` : "-"));
  });
  document.getElementById("mix").replaceChildren(svg);
}

function drawTracks(tracks) {
  const list = document.getElementById("tracks");
  document.getElementById("no-tracks").hidden = tracks.length > 0;
  const now = Date.now() / 1000;
  const items = tracks.slice(0, 12).map((t) => {
    const end = t.ended ?? now;
    const span = Math.max(1, end - t.started);
    const bar = svgEl("svg", { viewBox: "0 0 300 12", preserveAspectRatio: "none", height: 12 });
    for (const s of t.segments) {
      const x = 300 * (s.start - t.started) / span;
      const w = Math.max(1, 300 * (s.end - s.start) / span);
      bar.append(svgEl("rect", { x, y: 0, width: w, height: 12, fill: emotionColor(s.emotion) },
        undefined));
      bar.lastChild.append(svgEl("title", {}, `${s.emotion} ${(s.end - s.start).toFixed(1)} s`));
    }
    const path = t.segments.map((s) => s.emotion).join(" → ");
    return el("li", { class: `track ${t.state}`, "data-track": String(t.track_id), "data-state": t.state,
      "data-kinds": t.kinds.join(" ") },
      el("div", { class: "title" }, el("strong", { text: `track ${t.track_id}` }),
        el("span", { text: path }),
        el("span", { class: "muted", text: `${t.state}, ${span.toFixed(0)} s` })),
      el("div", { class: "kinds", text: t.kinds.map((k, i) => i < t.segments.length && k !== "ended"
        ? `${k} ${clock(t.segments[i].start)}` : `${k} ${clock(t.ended)}`).join(" · ") }),
      el("div", { class: "timeline" }, bar));
  });
  list.replaceChildren(...items);
}

function drawPlot(history) {
  const bins = history.bins;
  const W = 900, H = 220, L = 36, B = 22, T = 8;
  const maxY = Math.max(1, ...bins.map((b) => Object.values(b.counts).reduce((a, c) => Math.max(a, c), 0)));
  const x = (i) => L + (W - L - 8) * (bins.length <= 1 ? 0 : i / (bins.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / maxY);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "faces per emotion over time" });
  for (const frac of [0, 0.5, 1]) {
    const v = Math.round(maxY * frac);
    svg.append(svgEl("line", { x1: L, x2: W - 8, y1: y(v), y2: y(v), stroke: "#2a3441" }));
    svg.append(svgEl("text", { x: L - 6, y: y(v) + 4, fill: "#8b98a7", "font-size": 11, "text-anchor": "end" }, String(v)));
  }
  for (const i of [0, Math.floor(bins.length / 2), bins.length - 1]) {
    if (bins[i]) svg.append(svgEl("text", { x: x(i), y: H - 6, fill: "#8b98a7", "font-size": 11, "text-anchor": "middle" },
      clock(bins[i].start)));
  }
  for (const name of EMOTIONS) {
    if (!bins.some((b) => b.counts[name])) continue;
    const points = bins.map((b, i) => `${x(i).toFixed(1)},${y(b.counts[name] || 0).toFixed(1)}`).join(" ");
    svg.append(svgEl("polyline", { class: "series", "data-emotion": name, points, fill: "none",
      stroke: emotionColor(name), "stroke-width": 2 }));
  }
  document.getElementById("plot").replaceChildren(svg);
  document.getElementById("legend").replaceChildren(...EMOTIONS.map((e) =>
    el("span", {}, el("span", { class: "swatch", style: `background:${emotionColor(e)}` }), e)));
}

async function refreshSummary() {
  try {
    const data = await getJSON(`/api/cameras/${encodeURIComponent(cameraId)}/summary`);
    drawMix(data.mix_last_minute);
    drawTracks(data.tracks);
    drawPlot(data.history);
    showBanner("");
  } catch (e) {
    showBanner(`Cannot load the camera's summary: ${e.message}`);
  }
}

async function init() {
  document.getElementById("camera-name").textContent = cameraId;
  document.title = `${cameraId} · emotion-stream`;
  let config = { frame_fps: 3 };
  try { config = await getJSON("/api/config"); } catch (e) { showBanner(`Cannot load settings: ${e.message}`); }
  let cam = { id: cameraId, state: "unknown" };
  try {
    const data = await getJSON("/api/cameras");
    cam = data.cameras.find((c) => c.id === cameraId) || cam;
    if (!data.cameras.some((c) => c.id === cameraId)) showBanner(`Camera ${cameraId} is not configured.`);
  } catch (e) { showBanner(`Cannot load cameras: ${e.message}`); }
  const tile = new CameraTile(cam, config.frame_fps);
  document.getElementById("tile-slot").append(tile.root);
  tile.start();
  refreshSummary();
  setInterval(refreshSummary, 2000);
  setInterval(async () => {
    try {
      const data = await getJSON("/api/cameras");
      const c = data.cameras.find((x) => x.id === cameraId);
      if (c) tile.update(c);
    } catch (e) { /* the summary refresh reports connectivity */ }
  }, 3000);
}

init();
