// The accept-the-model strip: patches the latest model assigns to one class. Arrow keys move, F flips the
// focused patch to the model's second choice, a digit gives it another label, X leaves it out, and Enter
// sends the whole strip as one action (POST suggestions/accept/: one transaction on the server), then
// loads the next strip.
import { api, el, isTyping, pageConfig } from "./api.js";

const config = pageConfig();
const base = config.api;
const labelsByHotkey = new Map(config.labels.map((label) => [label.hotkey, label]));
const ui = {
  strip: document.getElementById("strip"),
  label: document.getElementById("strip-label"),
  order: document.getElementById("strip-order"),
  n: document.getElementById("strip-n"),
  cls: document.getElementById("strip-class"),
  status: document.getElementById("strip-status"),
  error: document.getElementById("strip-error"),
};
const state = { items: [], focus: 0, version: null, label: null, busy: false, request: 0 };

function showError(error) {
  ui.error.textContent = error.message || String(error);
  ui.error.hidden = false;
}

function columns() {
  const tiles = ui.strip.children;
  if (tiles.length < 2) return 1;
  const top = tiles[0].offsetTop;
  let n = 0;
  while (n < tiles.length && tiles[n].offsetTop === top) n += 1;
  return Math.max(1, n);
}

function render() {
  ui.strip.replaceChildren(
    ...state.items.map((item, i) => {
      const decided = item.choice === null ? "excluded" : item.choice === state.label ? "accepted" : "flipped";
      return el(
        "figure",
        {
          class: "strip-tile",
          role: "gridcell",
          "aria-selected": i === state.focus ? "true" : "false",
          dataset: { patch: String(item.id), decision: decided },
          onclick: () => {
            state.focus = i;
            render();
          },
        },
        el("img", { src: item.image_url, alt: `Patch ${item.id}`, width: 160, height: 160, loading: "lazy" }),
        el(
          "figcaption",
          {},
          decided === "excluded" ? "left out" : decided === "flipped" ? `→ ${item.choice}` : `${Math.round(item.probability * 100)}%`,
        ),
      );
    }),
  );
  ui.strip.dataset.focus = String(state.focus);
}

async function load() {
  ui.error.hidden = true;
  ui.strip.dataset.state = "loading";
  const params = new URLSearchParams({ label: ui.label.value, order: ui.order.value, n: ui.n.value || "24" });
  const request = ++state.request; // a newer choice of class, order or size wins over a slower older answer
  try {
    const body = await api(`${base}suggestions/?${params}`);
    if (request !== state.request) return;
    state.version = body.model_version;
    state.label = body.label;
    state.items = body.patches.map((p) => ({ ...p, choice: body.label }));
    state.focus = 0;
    ui.cls.textContent = body.label;
    render();
    ui.strip.dataset.state = state.items.length ? "ready" : "empty";
    ui.strip.focus(); // the keys act on the strip, not on the field just changed
    if (body.model_version === null) ui.status.textContent = "No model yet: run a training round first.";
    else if (!state.items.length) ui.status.textContent = `Nothing left that the model calls ${body.label}.`;
  } catch (error) {
    if (request !== state.request) return;
    ui.strip.dataset.state = "error";
    showError(error);
  }
}

async function submit() {
  if (state.busy || !state.items.length) return;
  state.busy = true;
  const accept = state.items.filter((i) => i.choice === state.label).map((i) => i.id);
  const relabel = state.items
    .filter((i) => i.choice !== null && i.choice !== state.label)
    .map((i) => ({ patch: i.id, label: i.choice }));
  try {
    if (accept.length || relabel.length) {
      const result = await api(`${base}suggestions/accept/`, {
        method: "POST",
        body: { label: state.label, model_version: state.version, accept, relabel },
      });
      ui.status.textContent = `Recorded ${result.votes.length} votes (${accept.length} accepted, ${relabel.length} changed)` +
        (result.skipped.length ? `; ${result.skipped.length} you had already labelled.` : ".");
    }
    await load();
  } catch (error) {
    showError(error);
  } finally {
    state.busy = false;
  }
}

function move(delta) {
  if (!state.items.length) return;
  state.focus = Math.min(state.items.length - 1, Math.max(0, state.focus + delta));
  render();
}

document.addEventListener("keydown", (event) => {
  if (event.repeat || event.altKey || event.ctrlKey || event.metaKey || isTyping(event.target)) return;
  const item = state.items[state.focus];
  const key = event.key;
  if (key === "ArrowRight") move(1);
  else if (key === "ArrowLeft") move(-1);
  else if (key === "ArrowDown") move(columns());
  else if (key === "ArrowUp") move(-columns());
  else if (key === "Enter") submit();
  else if ((key === "f" || key === "F") && item) {
    item.choice = item.choice === state.label ? item.runner_up : state.label;
    render();
  } else if ((key === "x" || key === "X") && item) {
    item.choice = item.choice === null ? state.label : null;
    render();
  } else if (labelsByHotkey.has(key) && item) {
    item.choice = labelsByHotkey.get(key).name;
    render();
  } else return;
  event.preventDefault();
});

for (const input of [ui.label, ui.order, ui.n]) input.addEventListener("change", () => load());
load();
