// The embedding map: the project's patches as points (WebGL, regl-scatterplot), coloured by consensus,
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
// map.html, this module only picks it up), in parallel with the scatterplot's scripts and the WebGL set-up.
import { ApiError, api, el, errorMessage, isTyping, pageConfig, paintLabelColours } from "./api.js";

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
  // The plot's k-d tree of the points depends on their positions only: a redraw of the same stored layout (new
  // colours after a label) reuses it instead of building it again (0.3 s at 200,000 points on a busy CPU).
  const index = state.index && state.index.map === state.map.header.map ? state.index.data : undefined;
  await state.plot.draw(data, { preventFilterReset: true, zDataType: "categorical", spatialIndex: index });
  state.index = { map: state.map.header.map, data: state.plot.get("spatialIndex") };
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

// While the points are redrawn the scatterplot ignores the mouse (a lasso started then is lost): the page says
// so in data-map-ready ("refreshing", then "true") for scripts, and the status line says it for people.
// A label cast while the map is being redrawn (a key pressed right after the last) asks for one more redraw
// once this one is done, rather than a second at the same time (the plot refuses to draw while it draws).
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
  const canvas = $("map-canvas");
  const { default: createScatterplot, createRenderer } = window.createScatterplot;
  // The plot draws into a renderer's WebGL canvas (a float framebuffer, then a full-canvas pass) and copies
  // that onto the page's 2-D canvas every frame with drawImage, which reads the WebGL pixels back: without a
  // GPU (SwiftShader) that copy was most of the first paint (2.4 s of 200,000 points' 7 s, in a CPU profile).
  // So the renderer's canvas is shown itself, over the plot's canvas (which keeps the pointer events), at the
  // plot's size (its own renderer is the window's size, 2.5x the pixels at 1920x1080), and the copy is skipped:
  // render() is handed a stand-in target of the same size whose 2-D context does nothing.
  const gl = el("canvas", { class: "map-gl", "aria-hidden": "true" });
  canvas.after(gl);
  const renderer = createRenderer({ canvas: gl });
  const fit = () => {
    const { width, height } = canvas.getBoundingClientRect(); // as the plot sizes its canvas
    renderer.resize(Math.max(1, width), Math.max(1, height));
    renderer.refresh();
  };
  fit();
  new ResizeObserver(fit).observe(canvas);
  const noCopy = { clearRect() {}, drawImage() {} };
  const render = renderer.render;
  renderer.render = (draw, target) => render(draw, { width: target.width, height: target.height, getContext: () => noCopy });
  state.plot = createScatterplot({
    renderer,
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
    document.body.dataset.mapReady = "true";
  } catch (error) {
    status(error.message, true);
    document.body.dataset.mapReady = "error";
  }
  // For tests and the console: the plot and the decoded map.
  window.histoloopMap = state;
}

start();
