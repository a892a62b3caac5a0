// The embedding map: the project's patches as points (WebGL, scatter.js), coloured by consensus,
// prediction, uncertainty or slide; hover shows the patch; Shift + drag lassoes a region into a
// virtualised gallery, from which an expert labels all (or all but the clicked) in one bulk action.
// The points arrive as one binary payload (learner/maps.py documents the format) read into typed arrays.
//
// Once a model has scored the pool, the gallery is ordered by the model's prediction, surest first, so the
// patches of another class than most of a lasso's sit together (a coloured bar on each tile says which class
// the model sees); a click leaves one patch out, Shift + click leaves out (or takes back) the whole run from
// the last clicked tile, and a label's key labels all but the left-out ones.
//
// The first paint is on the critical path: the map's request starts with the page (a preload link in
// map.html, this module only picks it up), in parallel with the page's two small modules and the WebGL set-up;
// the payload's float32 positions go to the GPU as they came, the colours as one RGBA byte per channel.
import { ApiError, api, el, errorMessage, isTyping, pageConfig, paintLabelColours } from "./api.js";
import { createScatter } from "./scatter.js";

performance.mark("map:module");

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

const state = {
  map: null,
  plot: null,
  selection: [],
  excluded: new Set(),
  anchor: null, // the gallery position of the last plain click: Shift + click extends from it
  colourBy: "consensus",
  order: "prediction",
  lastBatch: null,
};
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

// No custom headers: the request must match map.html's preload of the same URL to reuse its response (the
// server answers the binary map whatever the Accept header says; errors come as JSON).
async function loadMap() {
  const response = await fetch(MAP_URL, { credentials: "same-origin" });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(errorMessage(body, response.status), response.status, body);
  }
  const buffer = await response.arrayBuffer();
  performance.mark("map:fetched");
  return decodeMap(buffer);
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

// One RGBA byte quadruple per point: the channel's code through a table of its palette (256 entries at most).
function hexRgba(hex, alpha) {
  const v = Number.parseInt(hex.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255, Math.round(alpha * 255)];
}

function colours(map, by, alpha) {
  const c = channel(map, by);
  const table = new Uint32Array(256);
  const bytes = new Uint8Array(table.buffer);
  for (let code = 0; code < 256; code += 1) {
    bytes.set(hexRgba(c.palette[c.index(code)] || GREY, alpha), 4 * code);
  }
  const out = new Uint32Array(map.count); // little-endian words: r, g, b, a in byte order, as the table
  const values = c.values;
  for (let i = 0; i < map.count; i += 1) out[i] = table[values[i]];
  return { rgba: new Uint8Array(out.buffer), legend: c.legend };
}

async function draw() {
  const n = state.map.count;
  const { rgba, legend } = colours(state.map, state.colourBy, n > 200000 ? 0.6 : 0.9);
  // The same stored layout again (new colours after a label) keeps the positions on the GPU and the picking grid.
  const same = state.drawn && state.drawn.header.map === state.map.header.map && state.drawn.count === n;
  if (same) state.map.xy = state.drawn.xy;
  const painted = state.plot.draw({ xy: state.map.xy, colours: rgba, size: n > 200000 ? 2 : n > 20000 ? 3 : 5 });
  state.drawn = state.map;
  if (state.selection.length) state.plot.select(state.selection, { preventEvent: true });
  else state.plot.deselect({ preventEvent: true });
  drawLegend(legend);
  await painted;
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

// The model's class of a point as a colour and a name (null when the pool is not scored yet).
function predicted(i) {
  const h = state.map.header;
  const code = state.map.prediction[i];
  if (!code || !h.classes[code - 1]) return null;
  const name = h.classes[code - 1].name;
  return { name, colour: labelColour(name) || SLIDE_PALETTE[code % 20], unsure: state.map.uncertainty[i] > 5 };
}

// The gallery's order: by the model's prediction (class by class, surest first; unscored last), or by patch id.
function ordered(indices) {
  const m = state.map;
  const byId = (a, b) => m.ids[a] - m.ids[b];
  if (state.order !== "prediction" || !m.header.model_version) return indices.sort(byId);
  const klass = (i) => (m.prediction[i] ? m.prediction[i] : 256);
  return indices.sort((a, b) => klass(a) - klass(b) || m.uncertainty[a] - m.uncertainty[b] || byId(a, b));
}

function paintTile(tile) {
  const left = state.excluded.has(Number(tile.dataset.id));
  tile.classList.toggle("excluded", left);
  tile.setAttribute("aria-pressed", left ? "true" : "false");
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
    const i = state.selection[k];
    const id = state.map.ids[i];
    const model = predicted(i);
    const seen = model ? ` (model: ${model.name}${model.unsure ? ", unsure" : ""})` : "";
    const tile = el(
      "button",
      { type: "button", class: `gallery-tile${state.excluded.has(id) ? " excluded" : ""}`, dataset: { k: String(k), id: String(id) }, "aria-pressed": state.excluded.has(id) ? "true" : "false", title: `patch ${id}${seen}: click to leave it out, Shift + click to leave out the run from the last clicked` },
      el("img", { src: imageUrl(id), alt: `patch ${id}`, loading: "lazy", width: TILE, height: TILE }),
      model ? el("span", { class: "gallery-model", "aria-hidden": "true" }) : null,
    );
    if (model) tile.style.setProperty("--model-colour", model.colour);
    tile.style.transform = `translate(${GAP + c * (TILE + GAP)}px, ${GAP + r * (TILE + GAP)}px)`;
    space.append(tile);
  }
}

function toggleExcluded(tile) {
  const id = Number(tile.dataset.id);
  if (state.excluded.has(id)) state.excluded.delete(id);
  else state.excluded.add(id);
  state.anchor = Number(tile.dataset.k);
  paintTile(tile);
  updateActions();
}

// Shift + click: every tile from the anchor (the last plain click) to this one takes the anchor's state, as a
// file manager extends a selection; without an anchor it is a plain click.
function extendExcluded(tile) {
  if (state.anchor === null || state.anchor >= state.selection.length) {
    toggleExcluded(tile);
    return;
  }
  const to = Number(tile.dataset.k);
  const leave = state.excluded.has(state.map.ids[state.selection[state.anchor]]);
  for (let k = Math.min(state.anchor, to); k <= Math.max(state.anchor, to); k += 1) {
    const id = state.map.ids[state.selection[k]];
    if (leave) state.excluded.add(id);
    else state.excluded.delete(id);
  }
  for (const node of $("gallery-space").children) paintTile(node);
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
        { type: "button", class: "bulk-label", dataset: { label: String(label.id), colour: label.colour }, disabled: !n || tooMany || !chosenCount(), "aria-keyshortcuts": label.hotkey || null, title: label.hotkey ? `Key: ${label.hotkey}` : null },
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
  state.selection = ordered(Array.from(indices));
  state.excluded = new Set();
  state.anchor = null;
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
  state.busy = true;
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
    state.busy = false; // the next label may go while the map is recoloured
    await refresh();
  } catch (error) {
    showError(error.message);
  } finally {
    state.busy = false;
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

// While the map is fetched and recoloured after a label the page says so in data-map-ready ("refreshing", then
// "true") for scripts, and the status line says it for people. A label cast meanwhile (a key pressed right after
// the last) asks for one more redraw once this one is done, rather than a second fetch at the same time.
async function refresh() {
  if (state.refreshing) {
    state.refreshAgain = true;
    return state.refreshing;
  }
  const status = $("map-status").textContent;
  document.body.dataset.mapReady = "refreshing";
  $("map-status").textContent = "Updating the map's colours…";
  state.refreshing = (async () => {
    try {
      do {
        state.refreshAgain = false;
        state.map = await loadMap();
        await draw();
      } while (state.refreshAgain);
    } finally {
      $("map-status").textContent = status;
      document.body.dataset.mapReady = "true";
      state.refreshing = null;
    }
  })();
  return state.refreshing;
}

// --- start ---------------------------------------------------------------------------------------------------------

async function start() {
  // The map's bytes first (already on their way: map.html preloads them), then the WebGL set-up meanwhile.
  const started = performance.now();
  const loading = loadMap().then((map) => ({ map }), (error) => ({ error }));
  try {
    const renderer = new URLSearchParams(window.location.search).get("renderer") || "auto";
    state.plot = createScatter({ canvas: $("map-canvas"), glCanvas: $("map-gl"), renderer });
  } catch (error) {
    status(error.message, true);
    document.body.dataset.mapReady = "error";
    return;
  }
  state.plot.subscribe("select", ({ points: selected }) => setSelection(selected));
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
    if (!tile) return;
    if (event.shiftKey) extendExcluded(tile);
    else toggleExcluded(tile);
  });
  // A label's key labels the selection (all but the left-out ones), as its button does; Escape takes back
  // every left-out mark.
  document.addEventListener("keydown", (event) => {
    if (isTyping(event.target) || event.ctrlKey || event.metaKey || event.altKey || !state.selection.length) return;
    if (event.key === "Escape" && state.excluded.size) {
      state.excluded.clear();
      state.anchor = null;
      for (const node of $("gallery-space").children) paintTile(node);
      updateActions();
      return;
    }
    const label = config.labels.find((l) => l.hotkey && l.hotkey === event.key);
    const button = label && $("bulk-actions").querySelector(`.bulk-label[data-label="${label.id}"]`);
    if (button && !button.disabled && !state.busy) {
      event.preventDefault();
      labelAll(label.id);
    }
  });
  $("gallery-order").addEventListener("change", (event) => {
    // The same patches in another order; what is left out stays left out.
    state.order = event.target.value;
    state.selection = ordered(state.selection.slice());
    state.anchor = null;
    $("gallery-space").replaceChildren();
    renderGallery();
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
  performance.mark("map:plot-ready");
  try {
    const { map, error } = await loading;
    if (error) throw error;
    state.map = map;
    performance.mark("map:decoded");
    await draw();
    performance.mark("map:drawn");
    const ms = Math.round(performance.now() - started);
    status(`${state.map.count.toLocaleString()} patches (${state.map.header.method} layout), drawn in ${ms} ms.`);
    $("map-canvas").dataset.renderer = state.plot.renderer;
    document.body.dataset.mapReady = "true";
  } catch (error) {
    status(error.message, true);
    document.body.dataset.mapReady = "error";
  }
  // For tests and the console: the plot and the decoded map.
  window.histoloopMap = state;
}

start();
