// Slide viewer: OpenSeadragon on the slide's tile pyramid, a scale bar, patch overlays, patch details.
import { api, el, isTyping, pageConfig, paintLabelColours } from "./api.js";
import { connectLive } from "./live.js";
import { PatchLayer } from "./patch-layer.js";
import { attachScaleBar } from "./scalebar.js";
import { similarPanel } from "./similar-panel.js";

const config = pageConfig();
paintLabelColours();
const OSD = window.OpenSeadragon;
const base = config.api;
const slide = config.slide;
const isExpert = config.role !== "crowd";
const labelsByHotkey = new Map(config.labels.map((label) => [label.hotkey, label]));
// The patch on show in the panel, for the keyboard: { patch, mine, message } (mine: my active vote).
let shown = null;

const ui = {
  osd: document.getElementById("osd"),
  error: document.getElementById("viewer-error"),
  grid: document.getElementById("show-grid"),
  labels: document.getElementById("show-labels"),
  heatmap: document.getElementById("show-heatmap"),
  heatmapLabel: document.getElementById("heatmap-label"),
  overlayStatus: document.getElementById("overlay-status"),
  panel: document.getElementById("patch-panel"),
  panelTitle: document.getElementById("patch-title"),
  panelBody: document.getElementById("patch-body"),
};

// Read by the end-to-end tests and the benchmark.
const metrics = { tilesLoaded: 0, viewerFullyLoadedMs: null };
window.histoloopMetrics = metrics;

function fail(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
  ui.osd.dataset.state = "error";
}

function tileSource(info) {
  const template = info.tileUrlTemplate;
  return {
    width: info.width,
    height: info.height,
    tileWidth: info.tileWidth,
    tileHeight: info.tileHeight,
    tileOverlap: info.tileOverlap || 0,
    minLevel: info.minLevel,
    maxLevel: info.maxLevel,
    getTileUrl: (level, x, y) => template.replace("{z}", level).replace("{x}", x).replace("{y}", y),
  };
}

function openViewer(info) {
  const viewer = OSD({
    element: ui.osd,
    prefixUrl: config.osd_images,
    tileSources: tileSource(info),
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    visibilityRatio: 0.5,
    maxZoomPixelRatio: 2,
    animationTime: 0.6,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
  });
  window.histoloopViewer = viewer;
  viewer.addHandler("open", () => {
    ui.osd.dataset.state = "open";
    const item = viewer.world.getItemAt(0);
    item.addHandler("fully-loaded-change", (event) => {
      if (!event.fullyLoaded) return;
      if (metrics.viewerFullyLoadedMs === null) metrics.viewerFullyLoadedMs = performance.now();
      ui.osd.dataset.state = "loaded";
    });
  });
  viewer.addHandler("open-failed", (event) => fail(`The slide could not be opened: ${event.message}`));
  viewer.addHandler("tile-loaded", () => {
    metrics.tilesLoaded += 1;
  });
  viewer.addHandler("tile-load-failed", () => {
    ui.overlayStatus.textContent = "Some tiles could not be loaded; pan or zoom to try again.";
  });
  return viewer;
}

function setStatus(text) {
  ui.overlayStatus.textContent = text;
}

// The overlay comes as one array per field (compact at 50,000 patches); the layer wants objects.
function unpackOverlay(body) {
  const c = body.patches;
  const out = new Array(body.count);
  for (let i = 0; i < body.count; i++) {
    const label = c.label[i];
    out[i] = {
      id: c.id[i],
      x: c.x[i],
      y: c.y[i],
      size: c.size[i],
      label: label === null ? null : body.labels[label],
      colour: label === null ? null : body.colours[label],
      status: c.status[i] === null ? null : body.statuses[c.status[i]],
      is_gold: c.is_gold[i],
    };
  }
  return out;
}

async function loadOverlay(layer) {
  try {
    layer.patches = unpackOverlay(await api(`${base}overlay/?slide=${slide.id}`));
  } catch (error) {
    setStatus(error.status === 404 ? "Patch overlays are not available on this server yet." : error.message);
    return;
  }
  const labelled = layer.patches.filter((p) => p.label).length;
  ui.osd.dataset.overlayPatches = String(layer.patches.length);
  ui.osd.dataset.labelled = String(labelled);
  setStatus(`${layer.patches.length} patches, ${labelled} with a consensus label.`);
  layer.schedule();
}

async function loadHeatmap(layer) {
  if (!ui.heatmap.checked) {
    layer.show.heatmap = false;
    layer.schedule();
    return;
  }
  const label = ui.heatmapLabel.value;
  setStatus(`Loading predictions for ${label}…`);
  let body;
  try {
    body = await api(`${base}heatmap/?slide=${slide.id}&label=${encodeURIComponent(label)}`);
  } catch (error) {
    setStatus(error.status === 404 ? "Prediction heatmaps are not available on this server yet." : error.message);
    return;
  }
  if (body.model_version === null || body.model_version === undefined) {
    setStatus("No model has been trained yet: start a training round from the dashboard.");
    layer.heatmap = [];
  } else {
    const c = body.patches;
    layer.heatmap = Array.from({ length: body.count }, (_, i) => ({
      id: c.id[i],
      x: c.x[i],
      y: c.y[i],
      size: c.size[i],
      prob: c.prob[i],
    }));
    setStatus(`Model ${body.model_version}: probability of ${body.label} on ${body.count} patches.`);
  }
  ui.osd.dataset.heatmapPatches = String(layer.heatmap.length);
  layer.show.heatmap = true;
  layer.schedule();
}

function voteList(votes) {
  if (!votes.length) return el("p", { class: "note", text: "No votes yet." });
  return el(
    "ul",
    { class: "patch-votes" },
    votes.map((v) =>
      el("li", { class: v.is_active ? "" : "note" }, `${v.annotator} (${v.role}): ${v.label_name}`, v.is_active ? "" : " — withdrawn"),
    ),
  );
}

async function labelPatch(layer, patch, label, mine, message) {
  try {
    if (mine) await api(`${base}votes/${mine.id}/correct/`, { method: "POST", body: { label: label.id } });
    else await api(`${base}votes/`, { method: "POST", body: { patch: patch.id, label: label.id } });
  } catch (error) {
    message.className = "message error";
    message.textContent = error.message;
    return;
  }
  await loadOverlay(layer);
  await showPatch(layer, layer.patches.find((p) => p.id === patch.id) || patch);
}

// Reading order (top to bottom, left to right), for stepping through patches with the keyboard.
function readingOrder(patches) {
  return [...patches].sort((a, b) => a.y - b.y || a.x - b.x);
}

function stepPatch(viewer, layer, direction, unlabelledOnly) {
  const order = readingOrder(unlabelledOnly ? layer.patches.filter((p) => !p.label) : layer.patches);
  if (!order.length) {
    setStatus(unlabelledOnly ? "Every patch on this slide has a consensus label." : "This slide has no patches.");
    return;
  }
  const current = layer.selected;
  let index;
  if (!current) index = direction > 0 ? 0 : order.length - 1;
  else {
    // The first patch after (or before) the selected one in reading order, wrapping around.
    const after = (p) => p.y > current.y || (p.y === current.y && p.x > current.x);
    const before = (p) => p.y < current.y || (p.y === current.y && p.x < current.x);
    index = direction > 0 ? order.findIndex(after) : order.findLastIndex(before);
    if (index < 0) index = direction > 0 ? 0 : order.length - 1;
  }
  const patch = order[index];
  const item = viewer.world.getItemAt(0);
  viewer.viewport.panTo(item.imageToViewportCoordinates(patch.x + patch.size / 2, patch.y + patch.size / 2));
  showPatch(layer, patch);
}

function closePanel(layer) {
  layer.selected = null;
  shown = null;
  layer.schedule();
  ui.panel.hidden = true;
}

function bindKeys(viewer, layer) {
  const similar = similarPanel({
    base,
    labels: config.labels,
    canLabel: isExpert,
    patchId: () => (layer.selected ? layer.selected.id : null),
  });
  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.altKey || event.ctrlKey || event.metaKey || isTyping(event.target)) return;
    const key = event.key.toLowerCase();
    if (key === "n" || key === "p") {
      event.preventDefault();
      stepPatch(viewer, layer, key === "n" ? 1 : -1, event.shiftKey);
    } else if (key === "m" && layer.selected) {
      event.preventDefault();
      similar.toggle();
    } else if (event.key === "Escape" && layer.selected) {
      event.preventDefault();
      closePanel(layer);
    } else if (isExpert && shown && labelsByHotkey.has(event.key)) {
      event.preventDefault();
      labelPatch(layer, shown.patch, labelsByHotkey.get(event.key), shown.mine, shown.message);
    }
  });
}

async function showPatch(layer, patch) {
  layer.selected = patch;
  shown = null;
  layer.schedule();
  ui.panel.hidden = false;
  ui.panelTitle.textContent = `Patch ${patch.id}`;
  ui.panelBody.replaceChildren(el("p", { class: "note", text: "Loading…" }));
  let detail;
  try {
    detail = await api(`${base}patches/${patch.id}/`);
  } catch (error) {
    if (layer.selected === patch) ui.panelBody.replaceChildren(el("p", { class: "error", text: error.message }));
    return;
  }
  if (layer.selected !== patch) return; // another patch was chosen meanwhile
  const consensus = detail.consensus;
  const mine = detail.votes.find((v) => v.is_active && v.annotator === document.body.dataset.user);
  const parts = [
    el("img", { src: detail.patch.image_url, alt: `Patch ${patch.id}`, width: 160, height: 160, class: "thumb-large" }),
    el(
      "p",
      {},
      consensus && consensus.label_name
        ? `Consensus: ${consensus.label_name} (${consensus.status}, ${Math.round(consensus.confidence * 100)}% confidence, ${consensus.vote_count} votes)`
        : "No consensus label yet.",
    ),
    el("h3", { text: isExpert ? "Votes" : "Your vote" }),
    voteList(detail.votes),
  ];
  if (isExpert) {
    const message = el("p", { class: "message", role: "status" });
    const buttons = config.labels.map((label) =>
      el("button", {
        type: "button",
        class: "label-button",
        style: `--label-colour: ${label.colour}`,
        "aria-keyshortcuts": label.hotkey,
        onclick: () => labelPatch(layer, patch, label, mine, message),
      }, el("kbd", { text: label.hotkey }), ` ${label.name}`),
    );
    parts.push(el("h3", { text: mine ? "Change your label" : "Label this patch" }), el("div", { class: "labels" }, buttons), message);
    if (layer.selected === patch) shown = { patch, mine, message };
  } else {
    parts.push(el("p", { class: "note", text: "Label patches in the annotator; here you see your own votes." }));
  }
  ui.panelBody.replaceChildren(...parts);
}

async function main() {
  let info;
  try {
    info = await api(config.tilesource);
  } catch (error) {
    fail(error.message);
    return;
  }
  const viewer = openViewer(info);
  attachScaleBar(viewer, document.getElementById("scale-bar"), slide.mpp);
  const layer = new PatchLayer(viewer, OSD);
  layer.show.grid = ui.grid.checked;
  layer.show.labels = ui.labels.checked;
  ui.grid.addEventListener("change", () => {
    layer.show.grid = ui.grid.checked;
    layer.schedule();
  });
  ui.labels.addEventListener("change", () => {
    layer.show.labels = ui.labels.checked;
    layer.schedule();
  });
  ui.heatmap.addEventListener("change", () => loadHeatmap(layer));
  ui.heatmapLabel.addEventListener("change", () => ui.heatmap.checked && loadHeatmap(layer));
  viewer.addHandler("canvas-click", (event) => {
    if (!event.quick) return;
    const patch = layer.patchAt(event.position);
    if (patch) showPatch(layer, patch);
  });
  bindKeys(viewer, layer);
  await loadOverlay(layer);
  // A finished round brings new labels and a new model: refresh what is shown.
  connectLive(config.ws, {
    onEvent(event) {
      if (event.type === "round.finished" || event.type === "queue.refresh") {
        loadOverlay(layer);
        if (ui.heatmap.checked) loadHeatmap(layer);
      }
    },
  });
}

main();
