"use strict";
// The overview page: camera grid, live event feed (SSE), health, camera admin.

const tiles = new Map();
let config = { frame_fps: 3 };
let dynamicIngest = false;

async function refreshCameras() {
  let data;
  try {
    data = await getJSON("/api/cameras");
    showBanner("");
  } catch (e) {
    showBanner(`Cannot reach the web service: ${e.message}`);
    return;
  }
  dynamicIngest = data.dynamic;
  const grid = document.getElementById("grid");
  const seen = new Set();
  for (const cam of data.cameras) {
    seen.add(cam.id);
    let tile = tiles.get(cam.id);
    if (!tile) {
      tile = new CameraTile(cam, config.frame_fps);
      tiles.set(cam.id, tile);
      grid.append(tile.root);
      tile.start();
    }
    tile.update(cam);
  }
  for (const [id, tile] of tiles) {
    if (!seen.has(id)) { tile.stop(); tile.root.remove(); tiles.delete(id); }
  }
  document.getElementById("no-cameras").hidden = data.cameras.length > 0;
  const up = data.cameras.filter((c) => c.state === "up").length;
  document.getElementById("summary").textContent = `${data.cameras.length} cameras, ${up} up`;
  renderAdmin(data);
  fillCameraFilter(data.cameras.map((c) => c.id));
}

function fillCameraFilter(ids) {
  const select = document.getElementById("filter-camera");
  const have = new Set([...select.options].map((o) => o.value));
  for (const id of ids) if (!have.has(id)) select.append(el("option", { value: id, text: id }));
}

// ---------------------------------------------------------------- live feed

const feed = { source: null, seen: new Set(), max: 400 };

function feedUrl() {
  const params = new URLSearchParams();
  const cam = document.getElementById("filter-camera").value;
  const emo = document.getElementById("filter-emotion").value;
  const min = document.getElementById("filter-min-score").value;
  if (cam) params.append("camera", cam);
  if (emo) params.append("emotion", emo);
  if (min && Number(min) > 0) params.append("min_score", min);
  const zone = document.getElementById("filter-zone").value.trim();
  if (zone) params.append("zone", zone);
  return `/api/events?${params}`;
}

function openFeed() {
  if (feed.source) feed.source.close();
  feed.seen.clear();
  document.getElementById("feed").replaceChildren();
  const state = document.getElementById("feed-state");
  const source = new EventSource(feedUrl());
  feed.source = source;
  source.onopen = () => { state.textContent = "live"; state.className = "live"; };
  source.onerror = () => { state.textContent = "reconnecting…"; state.className = "down"; };
  source.addEventListener("problem", (e) => showBanner(`Event feed: ${JSON.parse(e.data)}`));
  source.onmessage = (e) => addFeedItem(JSON.parse(e.data));
}

function addFeedItem(ev) {
  if (feed.seen.has(ev.stream_id)) return;
  feed.seen.add(ev.stream_id);
  const list = document.getElementById("feed");
  const item = el("li", { class: "feed-item", "data-id": ev.stream_id, "data-label": ev.label, "data-camera": ev.camera,
    "data-zones": (ev.zones || []).join(" ") },
    el("span", { text: clock(ev.capture_ts) }),
    el("span", { text: ev.camera }),
    el("span", {}, el("span", { class: "swatch", style: `background:${emotionColor(ev.label)}` }), ev.label),
    el("span", { text: ev.score.toFixed(2) }),
    el("span", { class: "muted", text: ev.track_id === null ? "" : `track ${ev.track_id}` }));
  list.prepend(item);
  while (list.children.length > feed.max) {
    feed.seen.delete(list.lastElementChild.dataset.id);
    list.lastElementChild.remove();
  }
}

// ---------------------------------------------------------------- health

async function refreshHealth() {
  const box = document.getElementById("health");
  let data;
  try { data = await getJSON("/api/health"); } catch (e) { box.textContent = `health unavailable: ${e.message}`; return; }
  const parts = [];
  if (data.services.length === 0) {
    parts.push(el("p", { class: "muted", text: "No service metrics endpoints configured (web.services)." }));
  } else {
    const rows = data.services.map((s) => {
      const dropped = Object.values(s.dropped).reduce((a, b) => a + b, 0);
      const reasons = Object.entries(s.dropped).filter(([, n]) => n > 0).map(([r, n]) => `${r} ${n}`).join(", ");
      const ratio = s.frames_read > 0 ? `${(100 * dropped / s.frames_read).toFixed(1)}%` : "";
      return el("tr", { "data-service": s.name },
        el("td", { text: s.name }),
        el("td", { class: s.ok ? "ok" : "bad", text: s.error ? s.error : (s.ok ? "ok" : "stale") }),
        el("td", { text: s.heartbeat_age_s === null ? "-" : `${s.heartbeat_age_s.toFixed(1)} s` }),
        el("td", { text: `${dropped}${ratio ? ` (${ratio} of read)` : ""}${reasons ? `: ${reasons}` : ""}` }));
    });
    parts.push(el("table", {}, el("thead", {}, el("tr", {}, el("th", { text: "service" }), el("th", { text: "status" }),
      el("th", { text: "heartbeat" }), el("th", { text: "dropped frames" }))), el("tbody", {}, ...rows)));
  }
  const lagRows = data.streams.map((s) => el("tr", {}, el("td", { text: s.stream }), el("td", { text: s.group }),
    el("td", { text: s.length ?? "-" }), el("td", { text: s.pending ?? "-" }), el("td", { text: s.lag ?? "-" })));
  parts.push(el("table", { style: "margin-top:10px" }, el("thead", {}, el("tr", {}, el("th", { text: "stream" }),
    el("th", { text: "group" }), el("th", { text: "length" }), el("th", { text: "pending" }), el("th", { text: "lag" }))),
    el("tbody", {}, ...lagRows)));
  box.replaceChildren(...parts);
}

// ---------------------------------------------------------------- admin

function renderAdmin(data) {
  const note = document.getElementById("admin-note");
  note.textContent = data.dynamic ? "" :
    "Read-only: no ingest replica runs with ingest.dynamic: true, so camera changes would not take effect.";
  for (const id of ["cam-add", "cam-update"]) document.getElementById(id).disabled = !data.dynamic;
  const rows = data.cameras.map((cam) => {
    const edit = el("button", { type: "button", text: "Edit" });
    edit.onclick = () => {
      document.getElementById("cam-id").value = cam.id;
      document.getElementById("cam-url").value = cam.url || "";
      document.getElementById("cam-fps").value = cam.fps ?? 10;
      document.getElementById("cam-loop").checked = Boolean(cam.loop);
    };
    const remove = el("button", { type: "button", class: "remove", "data-camera": cam.id, text: "Remove" });
    remove.disabled = !data.dynamic;
    remove.onclick = () => cameraRequest("DELETE", `/api/cameras/${encodeURIComponent(cam.id)}`, null);
    return el("tr", { "data-camera": cam.id }, el("td", { text: cam.id }),
      el("td", { text: shortSource(cam.url), title: cam.url || "" }),
      el("td", { text: cam.fps ?? "-" }), el("td", { text: cam.loop === null ? "-" : (cam.loop ? "yes" : "no") }),
      el("td", {}, edit, " ", remove));
  });
  document.querySelector("#admin-table tbody").replaceChildren(...rows);
}

// A file's name is enough to recognise it; the whole (masked) source is in the tooltip and the form.
function shortSource(url) {
  if (!url) return "-";
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url) || /^\d+$/.test(url)) return url;
  return url.split(/[\\/]/).pop();
}

function formCamera() {
  const fps = document.getElementById("cam-fps").value;
  return {
    id: document.getElementById("cam-id").value.trim(),
    url: document.getElementById("cam-url").value.trim(),
    fps: fps === "" ? 10 : Number(fps),
    loop: document.getElementById("cam-loop").checked,
  };
}

async function cameraRequest(method, url, body) {
  const msg = document.getElementById("admin-message");
  msg.className = ""; msg.textContent = "…";
  try {
    const options = { method, headers: { "Content-Type": "application/json" } };
    if (body) options.body = JSON.stringify(body);
    const res = await getJSON(url, options);
    msg.className = "ok"; msg.textContent = res.message;
  } catch (e) {
    msg.className = "error"; msg.textContent = e.message;
  }
  await refreshCameras();
}

function setupAdmin() {
  const form = document.getElementById("camera-form");
  form.addEventListener("submit", (e) => { e.preventDefault(); cameraRequest("POST", "/api/cameras", formCamera()); });
  document.getElementById("cam-update").onclick = () => {
    const cam = formCamera();
    cameraRequest("PUT", `/api/cameras/${encodeURIComponent(cam.id)}`, cam);
  };
}

async function init() {
  try { config = await getJSON("/api/config"); } catch (e) { showBanner(`Cannot load settings: ${e.message}`); }
  if (config.grafana_url) {
    const a = document.getElementById("grafana");
    a.href = config.grafana_url; a.hidden = false;
  }
  const emotion = document.getElementById("filter-emotion");
  for (const e of EMOTIONS) emotion.append(el("option", { value: e, text: e }));
  for (const id of ["filter-camera", "filter-emotion", "filter-min-score", "filter-zone"]) {
    document.getElementById(id).addEventListener("change", openFeed);
  }
  setupAdmin();
  await refreshCameras();
  openFeed();
  refreshHealth();
  setInterval(refreshCameras, 3000);
  setInterval(refreshHealth, 3000);
}

init();
