// "More like this": the nearest neighbours of the patch on screen, in embedding space (GET
// patches/<id>/similar/). Everyone sees the pictures; experts and admins also see each neighbour's
// consensus and may select neighbours (click) and label them at once (POST patches/<id>/similar/label/,
// one transaction, provenance "similar"). The crowd gets no labels from the server (blind labelling).
import { api, el } from "./api.js";

export function similarPanel({ base, labels, canLabel, patchId }) {
  const panel = document.getElementById("similar-panel");
  const grid = document.getElementById("similar-grid");
  const note = document.getElementById("similar-note");
  const actions = document.getElementById("similar-actions");
  const selected = new Set();
  let source = null;

  function caption(row) {
    const parts = [`d ${row.distance.toFixed(2)}`];
    if (row.consensus && row.consensus.label) parts.push(row.consensus.label);
    return parts.join(" · ");
  }

  async function show() {
    source = patchId();
    if (!source) return;
    panel.hidden = false;
    selected.clear();
    note.textContent = "Looking for similar patches…";
    grid.replaceChildren();
    try {
      const body = await api(`${base}patches/${source}/similar/?k=24`);
      note.textContent = `${body.neighbours.length} nearest of ${body.indexed} indexed patches` +
        (canLabel ? ": click to select, then label the selection." : ".");
      grid.replaceChildren(
        ...body.neighbours.map((row) => {
          const tile = el(
            "figure",
            { class: "similar-tile", dataset: { patch: String(row.id) }, "aria-pressed": "false" },
            el("img", { src: row.image_url, alt: `Similar patch ${row.id}`, width: 96, height: 96, loading: "lazy" }),
            el("figcaption", {}, caption(row)),
          );
          if (canLabel) {
            tile.addEventListener("click", () => {
              if (selected.has(row.id)) selected.delete(row.id);
              else selected.add(row.id);
              tile.setAttribute("aria-pressed", String(selected.has(row.id)));
            });
          }
          return tile;
        }),
      );
    } catch (error) {
      note.textContent = error.message || String(error);
    }
  }

  async function label(labelObj) {
    if (!selected.size || !source) return;
    try {
      const result = await api(`${base}patches/${source}/similar/label/`, {
        method: "POST",
        body: { label: labelObj.name, patches: [...selected] },
      });
      note.textContent = `Labelled ${result.votes.length} as ${labelObj.name}` +
        (result.skipped.length ? ` (${result.skipped.length} you had labelled already).` : ".");
      await show();
    } catch (error) {
      note.textContent = error.message || String(error);
    }
  }

  if (actions && canLabel) {
    actions.replaceChildren(
      ...labels.map((l) => el("button", { type: "button", onclick: () => label(l) }, `Label selected as ${l.name}`)),
    );
  }
  document.getElementById("similar-close")?.addEventListener("click", () => {
    panel.hidden = true;
  });

  return {
    toggle() {
      if (!panel.hidden && source === patchId()) panel.hidden = true;
      else show();
    },
  };
}
