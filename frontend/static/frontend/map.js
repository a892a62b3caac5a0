// The embedding map: the project's patches as points (WebGL, regl-scatterplot), coloured by consensus,
// prediction, uncertainty or slide; hover shows the patch; Shift + drag lassoes a region into a
// virtualised gallery, from which an expert labels all (or all but the clicked) in one bulk action.
// The points arrive as one binary payload (learner/maps.py documents the format) read into typed arrays.
import { ApiError, api, el, errorMessage, pageConfig, paintLabelColours } from "./api.js";

const config = pageConfig();
const MAP_URL = `${config.api}map/`;
const BULK_URL = `${config.api}votes/bulk/`;
const TILE = 88; // gallery tile edge (map.css), px
const GAP = 4;
const GREY = "#c8c8d0";
const SLIDE_PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
];
// Uncertainty buckets 1..10, sure (dark blue) to unsure (yellow); 0 (not scored) is grey.
const UNCERTAINTY_RAMP = [
  "#2c115f", "#3b0f70", "#51127c", "#721f81", "#932b80", "#b73779", "#d8456c", "#f1605d", "#fc8961", "#fcfdbf",
];

const state = { map: null, plot: null, selection: [], excluded: new Set(), colourBy: "consensus", lastBatch: null };
const $ = (id) => document.getElementById(id);

function status(text, isError = false) {
  const node = $("map-status");
  node.textContent = text;
  node.classList.toggle("error", isError);
}

// --- the payload ---------------------------------------------------------------------------------------------------

const TYPED = { uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array, float32: Float32Array, float64: Float64Array };

export function decodeMap(buffer) {
  const view = new DataView(buffer);
  const magic = new TextDecoder().decode(new Uint8Array(buffer, 0, 4));
  if (magic !== "HLMP") throw new Error("The server's answer is not an embedding map.");
  const version = view.getUint32(4, true);
  if (version !== 1) throw new Error(`Map format ${version} is newer than this page; reload it.`);
  const headerLength = view.getUint32(8, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 12, headerLength)));
  const arrays = {};
  for (const a of header.arrays) arrays[a.name] = new TYPED[a.dtype](buffer, a.offset, a.count);
  return { header, ...arrays, count: header.count };
}

async function loadMap() {
  const response = await fetch(MAP_URL, { credentials: "same-origin", headers: { Accept: "application/vnd.histoloop.embedding-map, application/json" } });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(errorMessage(body, response.status), response.status, body);
  }
  return decodeMap(await response.arrayBuffer());
}

// --- colours -------------------------------------------------------------------------------------------------------

function labelColour(name) {
  const label = config.labels.find((l) => l.name === name);
  return label ? label.colour : null;
}

// Per channel: the palette (index = the z value drawn) and a function from a point's code to that index.
function channel(map, by) {
  const h = map.header;
  if (by === "consensus") {
    const palette = [GREY, ...h.labels.map((l) => l.colour || SLIDE_PALETTE[l.code % 20]), "#111111"];
    const contested = palette.length - 1;
    const legend = [["No label yet", GREY], ...h.labels.map((l) => [l.name, l.colour]), ["Contested", "#111111"]];
    return { values: map.consensus, palette, index: (c) => (c === h.contested_code ? contested : c), legend };
  }
  if (by === "prediction") {
    const palette = [GREY, ...h.classes.map((c) => labelColour(c.name) || SLIDE_PALETTE[c.code % 20])];
    const legend = [["Not scored", GREY], ...h.classes.map((c, i) => [c.name, palette[i + 1]])];
    if (!h.classes.length) legend[0][0] = "No model yet";
    return { values: map.prediction, palette, index: (c) => c, legend };
  }
  if (by === "uncertainty") {
    const palette = [GREY, ...UNCERTAINTY_RAMP];
    const legend = [["Not scored", GREY], ["Sure", UNCERTAINTY_RAMP[0]], ["Unsure", UNCERTAINTY_RAMP[9]]];
    return { values: map.uncertainty, palette, index: (c) => c, legend };
  }
  const palette = SLIDE_PALETTE;
  const legend = h.slides.slice(0, 20).map((s, i) => [s.name || `slide ${s.id}`, SLIDE_PALETTE[i % 20]]);
  return { values: map.slide, palette, index: (c) => c % SLIDE_PALETTE.length, legend };
}

function drawLegend(legend) {
  const list = $("map-legend");
  list.replaceChildren(...legend.map(([text, colour]) => el("li", { dataset: { colour: colour || GREY } }, text)));
  paintLabelColours(list);
}

function points(map, by) {
  const c = channel(map, by);
  const n = map.count;
  const x = new Float32Array(n);
  const y = new Float32Array(n);
  const z = new Float32Array(n);
  for (let i = 0; i < n; i += 1) {
    x[i] = map.xy[2 * i];
    y[i] = map.xy[2 * i + 1];
    z[i] = c.index(c.values[i]);
  }
  return { data: { x, y, z }, palette: c.palette, legend: c.legend };
}

async function draw() {
  const { data, palette, legend } = points(state.map, state.colourBy);
  const n = state.map.count;
  state.plot.set({ pointColor: palette, colorBy: "valueA", pointSize: n > 200000 ? 2 : n > 20000 ? 3 : 5, opacity: n > 200000 ? 0.6 : 0.9 });
  await state.plot.draw(data, { preventFilterReset: true, zDataType: "categorical" });
  if (state.selection.length) state.plot.select(state.selection, { preventEvent: true });
  else state.plot.deselect({ preventEvent: true });
  drawLegend(legend);
}

// --- hover ---------------------------------------------------------------------------------------------------------

function imageUrl(patchId) {
  return `/api/v1/patches/${patchId}/image.jpeg`;
}

function showHover(i) {
  const box = $("map-hover");
  const id = state.map.ids[i];
  const [sx, sy] = state.plot.getScreenPosition(i) || [0, 0];
  $("map-hover-img").src = imageUrl(id);
  const c = channel(state.map, state.colourBy);
  const name = c.legend.find(([, colour]) => colour === c.palette[c.index(c.values[i])]);
  $("map-hover-text").textContent = `patch ${id}${name ? ` · ${name[0]}` : ""}`;
  box.style.left = `${Math.round(sx + 12)}px`;
  box.style.top = `${Math.round(sy + 12)}px`;
  box.hidden = false;
}

// --- the gallery (virtualised: only the rows in view have elements, and only they load images) ----------------------

function galleryColumns() {
  return Math.max(1, Math.floor(($("gallery").clientWidth - GAP) / (TILE + GAP)));
}

function renderGallery() {
  const box = $("gallery");
  const space = $("gallery-space");
  const cols = galleryColumns();
  const rows = Math.ceil(state.selection.length / cols);
  space.style.height = `${rows * (TILE + GAP) + GAP}px`;
  const first = Math.max(0, Math.floor(box.scrollTop / (TILE + GAP)) - 2);
  const last = Math.min(rows, Math.ceil((box.scrollTop + box.clientHeight) / (TILE + GAP)) + 2);
  const wanted = new Map();
  for (let r = first; r < last; r += 1) {
    for (let c = 0; c < cols; c += 1) {
      const k = r * cols + c;
      if (k < state.selection.length) wanted.set(k, [r, c]);
    }
  }
  for (const tile of [...space.children]) {
    const k = Number(tile.dataset.k);
    if (!wanted.has(k) || tile.dataset.id !== String(state.map.ids[state.selection[k]])) tile.remove();
    else wanted.delete(k);
  }
  for (const [k, [r, c]] of wanted) {
    const id = state.map.ids[state.selection[k]];
    const tile = el(
      "button",
      { type: "button", class: `gallery-tile${state.excluded.has(id) ? " excluded" : ""}`, dataset: { k: String(k), id: String(id) }, "aria-pressed": state.excluded.has(id) ? "true" : "false", title: `patch ${id}: click to leave it out` },
      el("img", { src: imageUrl(id), alt: `patch ${id}`, loading: "lazy", width: TILE, height: TILE }),
    );
    tile.style.transform = `translate(${GAP + c * (TILE + GAP)}px, ${GAP + r * (TILE + GAP)}px)`;
    space.append(tile);
  }
}

function toggleExcluded(tile) {
  const id = Number(tile.dataset.id);
  if (state.excluded.has(id)) state.excluded.delete(id);
  else state.excluded.add(id);
  tile.classList.toggle("excluded", state.excluded.has(id));
  tile.setAttribute("aria-pressed", state.excluded.has(id) ? "true" : "false");
  updateActions();
}

function chosenCount() {
  return state.selection.length - state.excluded.size;
}

function updateActions() {
  const n = state.selection.length;
  const count = $("selection-count");
  count.textContent = n ? `(${n.toLocaleString()} patches${state.excluded.size ? `, ${state.excluded.size} left out` : ""})` : "(none: lasso a region)";
  const tooMany = n > config.max_bulk;
  const actions = $("bulk-actions");
  actions.replaceChildren(
    ...config.labels.map((label) =>
      el(
        "button",
        { type: "button", class: "bulk-label", dataset: { label: String(label.id), colour: label.colour }, disabled: !n || tooMany || !chosenCount() },
        state.excluded.size ? `Label all but ${state.excluded.size} as ${label.name}` : `Label all as ${label.name}`,
      ),
    ),
  );
  paintLabelColours(actions);
  showError(tooMany ? `One action labels at most ${config.max_bulk.toLocaleString()} patches; this selection has ${n.toLocaleString()}. Lasso a smaller region.` : "");
}

function showError(text) {
  const node = $("bulk-error");
  node.textContent = text;
  node.hidden = !text;
}

function showMessage(...children) {
  const node = $("bulk-message");
  node.replaceChildren(...children);
  node.hidden = !children.length;
}

function setSelection(indices) {
  state.selection = Array.from(indices).sort((a, b) => state.map.ids[a] - state.map.ids[b]);
  state.excluded = new Set();
  $("gallery").scrollTop = 0;
  $("gallery-space").replaceChildren(); // a tile kept from the old selection would keep its left-out mark
  updateActions();
  renderGallery();
}

// --- bulk labelling ------------------------------------------------------------------------------------------------

async function labelAll(labelId) {
  const patches = state.selection.map((i) => state.map.ids[i]);
  const exclude = [...state.excluded];
  showError("");
  try {
    const result = await api(BULK_URL, { method: "POST", body: { patches, exclude, label: labelId, source: "map" } });
    state.lastBatch = result.batch;
    const undo = el("button", { type: "button", id: "bulk-undo" }, "Undo");
    undo.addEventListener("click", () => undoBatch(result.batch.id));
    const rest = exclude.length ? ` The ${exclude.length.toLocaleString()} left out stay selected: label them next.` : "";
    showMessage(`Labelled ${result.created.toLocaleString()} patches as ${result.batch.label_name}${result.unchanged ? ` (${result.unchanged} already were)` : ""}.${rest} `, undo);
    // What was left out is what still needs a label: it becomes the selection, so the next action (all, or all
    // but some clicked again) labels it without another lasso.
    const leftOut = new Set(exclude);
    setSelection(state.selection.filter((i) => leftOut.has(state.map.ids[i])));
    await refresh();
  } catch (error) {
    showError(error.message);
  }
}

async function undoBatch(batchId) {
  showError("");
  try {
    const result = await api(`${BULK_URL}${batchId}/undo/`, { method: "POST" });
    showMessage(`Undone: ${result.retracted.toLocaleString()} votes retracted${result.restored ? `, ${result.restored} earlier votes restored` : ""}.`);
    await refresh();
  } catch (error) {
    showError(error.message);
  }
}

// While the points are redrawn the scatterplot ignores the mouse (a lasso started then is lost): the page says
// so in data-map-ready ("refreshing", then "true") for scripts, and the status line says it for people.
async function refresh() {
  const status = $("map-status").textContent;
  document.body.dataset.mapReady = "refreshing";
  $("map-status").textContent = "Updating the map's colours…";
  try {
    state.map = await loadMap();
    await draw();
  } finally {
    $("map-status").textContent = status;
    document.body.dataset.mapReady = "true";
  }
}

// --- start ---------------------------------------------------------------------------------------------------------

async function start() {
  const canvas = $("map-canvas");
  const createScatterplot = window.createScatterplot.default;
  state.plot = createScatterplot({
    canvas,
    width: "auto",
    height: "auto",
    pointSize: 4,
    lassoColor: [0.48, 0.18, 0.42, 1],
    pointColorActive: "#000000",
    // The spatial index is built in this page, not in a blob: worker the Content-Security-Policy refuses.
    spatialIndexUseWorker: false,
  });
  // A lasso closed where it began ends in a click there (the pointer went down and up at the same place),
  // which the plot takes for picking the point under it: that pick must not replace what the lasso caught.
  state.plot.subscribe("lassoEnd", () => {
    state.lassoEnd = { at: performance.now(), points: state.selection.slice() };
  });
  state.plot.subscribe("select", ({ points: selected }) => {
    const lasso = state.lassoEnd;
    state.lassoEnd = null;
    if (lasso && lasso.points.length && selected.length === 1 && performance.now() - lasso.at < 500) {
      state.plot.select(lasso.points, { preventEvent: true });
      return;
    }
    setSelection(selected);
  });
  state.plot.subscribe("deselect", () => setSelection([]));
  state.plot.subscribe("pointover", (i) => showHover(i));
  state.plot.subscribe("pointout", () => {
    $("map-hover").hidden = true;
  });
  $("colour-by").addEventListener("change", (event) => {
    state.colourBy = event.target.value;
    draw();
  });
  $("gallery").addEventListener("scroll", () => requestAnimationFrame(renderGallery));
  $("gallery").addEventListener("click", (event) => {
    const tile = event.target.closest(".gallery-tile");
    if (tile) toggleExcluded(tile);
  });
  $("bulk-actions").addEventListener("click", (event) => {
    const button = event.target.closest(".bulk-label");
    if (button) labelAll(Number(button.dataset.label));
  });
  window.addEventListener("resize", () => renderGallery());
  const compute = $("compute-map");
  if (compute) {
    compute.addEventListener("click", async () => {
      try {
        const result = await api(MAP_URL, { method: "POST", body: { force: true } });
        status(result.detail);
      } catch (error) {
        status(error.message, true);
      }
    });
  }
  updateActions();
  try {
    const started = performance.now();
    state.map = await loadMap();
    await draw();
    const ms = Math.round(performance.now() - started);
    status(`${state.map.count.toLocaleString()} patches (${state.map.header.method} layout), drawn in ${ms} ms.`);
    document.body.dataset.mapReady = "true";
  } catch (error) {
    status(error.message, true);
    document.body.dataset.mapReady = "error";
  }
  // For tests and the console: the plot and the decoded map.
  window.histoloopMap = state;
}

start();
