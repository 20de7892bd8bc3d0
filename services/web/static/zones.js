"use strict";
// The camera page's mask and zones editor: the camera's last frame with the outlines over it;
// polygons are drawn by clicks on the picture or typed as coordinates, and saved through the
// camera admin API (PUT /api/cameras/{id} with mask and zones only).

const geo = {
  data: { mask: [], zones: [] },
  frame: { width: 640, height: 480 },
  draft: null, // { kind: "mask" | "zone", name, points: [[x, y], ...] in fractions }
  dynamic: false,
};

function geoSvg() { return document.getElementById("geo-svg"); }

function geoRedraw() {
  const { width, height } = geo.frame;
  const shapes = geometryShapes(geo.data, width, height);
  if (geo.draft && geo.draft.points.length) {
    const px = polygonPixels(geo.draft.points, width, height);
    const scale = Math.max(1, width / 640);
    shapes.push(svgEl("polyline", { class: "draft", points: px.map((p) => p.join(",")).join(" "),
      "stroke-width": 2 * scale }));
    for (const [x, y] of px) shapes.push(svgEl("circle", { class: "draft-point", cx: x, cy: y, r: 4 * scale, fill: "#fff" }));
  }
  geoSvg().replaceChildren(...shapes);
}

function geoShowJson() {
  const area = document.getElementById("geo-json");
  area.value = JSON.stringify(geo.data, null, 1).replace(/\[\s+([-\d.e]+),\s+([-\d.e]+)\s+\]/g, "[$1, $2]");
  area.classList.remove("invalid");
}

function geoFromJson() {
  const area = document.getElementById("geo-json");
  let parsed;
  try { parsed = JSON.parse(area.value); } catch (e) { area.classList.add("invalid"); return; }
  if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) { area.classList.add("invalid"); return; }
  area.classList.remove("invalid");
  geo.data = { mask: Array.isArray(parsed.mask) ? parsed.mask : [], zones: Array.isArray(parsed.zones) ? parsed.zones : [] };
  geoRedraw();
}

function geoDrawingState() {
  const drawing = geo.draft !== null;
  document.getElementById("geo-finish").disabled = !drawing;
  document.getElementById("geo-cancel").disabled = !drawing;
  document.getElementById("geo-start").disabled = drawing;
  document.getElementById("geo-drawing").textContent = drawing
    ? `drawing ${geo.draft.kind === "zone" ? `zone ${geo.draft.name}` : "a mask polygon"}: ${geo.draft.points.length} points`
    : "";
}

function geoStart() {
  const kind = document.getElementById("geo-kind").value;
  const name = document.getElementById("geo-zone-name").value.trim();
  if (kind === "zone" && !name) { geoMessage("error", "Name the zone first."); return; }
  geo.draft = { kind, name, points: [] };
  geoMessage("", "");
  geoDrawingState();
}

function geoClick(evt) {
  if (!geo.draft) return;
  const svg = geoSvg();
  const pt = svg.createSVGPoint();
  pt.x = evt.clientX; pt.y = evt.clientY;
  const p = pt.matrixTransform(svg.getScreenCTM().inverse());
  const fx = Math.min(1, Math.max(0, p.x / geo.frame.width));
  const fy = Math.min(1, Math.max(0, p.y / geo.frame.height));
  geo.draft.points.push([Math.round(fx * 1000) / 1000, Math.round(fy * 1000) / 1000]);
  geoDrawingState();
  geoRedraw();
}

function geoFinish() {
  const d = geo.draft;
  if (!d) return;
  if (d.kind === "zone") geo.data.zones.push({ name: d.name, points: d.points });
  else geo.data.mask.push(d.points);
  geo.draft = null;
  geoDrawingState();
  geoShowJson();
  geoRedraw();
}

function geoCancel() {
  geo.draft = null;
  geoDrawingState();
  geoRedraw();
}

function geoMessage(kind, text) {
  const m = document.getElementById("geo-message");
  m.className = kind; m.textContent = text;
}

function geoErrors(lines) {
  // "zones[1].points[2]: reason (got ...)": the field is named first
  const items = lines.map((line) => {
    const m = /^((?:mask|zones)(?:\[\d+\]|\.\w+)*): /.exec(line);
    return el("li", { class: "geo-error", "data-field": m ? m[1] : "", text: line });
  });
  document.getElementById("geo-errors").replaceChildren(...items);
}

async function geoSave() {
  geoFromJson();
  if (document.getElementById("geo-json").classList.contains("invalid")) {
    geoMessage("error", "The coordinates are not valid JSON."); return;
  }
  geoMessage("", "…");
  try {
    const res = await getJSON(`/api/cameras/${encodeURIComponent(cameraId)}`, {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ mask: geo.data.mask, zones: geo.data.zones }) });
    geoErrors([]);
    geoMessage("ok", res.message);
  } catch (e) {
    geoErrors(e.message.split("\n"));
    geoMessage("error", e.status === 422 ? "Not saved: see the problems below." : `Not saved: ${e.message}`);
  }
}

async function geoLoad() {
  const data = await getJSON("/api/cameras");
  geo.dynamic = data.dynamic;
  const cam = data.cameras.find((c) => c.id === cameraId);
  geo.data = { mask: (cam && cam.mask) || [], zones: (cam && cam.zones) || [] };
  document.getElementById("geo-save").disabled = !geo.dynamic;
  if (!geo.dynamic) {
    geoMessage("", "Read-only: no ingest replica runs with ingest.dynamic: true; set mask and zones in the settings file.");
  }
  geoShowJson();
  geoRedraw();
}

async function geoFrame() {
  const data = await getJSON(`/api/cameras/${encodeURIComponent(cameraId)}/latest`);
  if (!data.frame) return false;
  geo.frame = { width: data.frame.width, height: data.frame.height };
  geoSvg().setAttribute("viewBox", `0 0 ${data.frame.width} ${data.frame.height}`);
  document.getElementById("geo-frame").style.aspectRatio = `${data.frame.width} / ${data.frame.height}`;
  await loadImage(document.getElementById("geo-img"),
    `/api/cameras/${encodeURIComponent(cameraId)}/frames/${data.frame.id}.jpg`);
  document.getElementById("geo-empty").style.display = "none";
  geoRedraw();
  return true;
}

async function geoInit() {
  document.getElementById("geo-start").onclick = geoStart;
  document.getElementById("geo-finish").onclick = geoFinish;
  document.getElementById("geo-cancel").onclick = geoCancel;
  document.getElementById("geo-save").onclick = geoSave;
  document.getElementById("geo-reload").onclick = () => geoLoad().catch((e) => geoMessage("error", e.message));
  document.getElementById("geo-json").addEventListener("input", geoFromJson);
  geoSvg().addEventListener("click", geoClick);
  try { await geoLoad(); } catch (e) { geoMessage("error", `Cannot load the camera: ${e.message}`); }
  // The preview is the camera's last frame; until one exists, look again now and then.
  for (;;) {
    try { if (await geoFrame()) break; } catch (e) { /* the summary refresh reports connectivity */ }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  document.getElementById("geo-panel").dataset.ready = "1";
}

geoInit();
