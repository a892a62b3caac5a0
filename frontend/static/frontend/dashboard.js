// Admin dashboard: slides, queue, training rounds with live progress, learning curve, agreement (also by how
// votes were made), students (gold answers, certification, learning curves), labelling speed per mode, the
// suggestion weight and the students settings, exports.
import { api, el, pageConfig } from "./api.js";
import { drawLearningCurve } from "./learning-curve.js";
import { connectLive, statusBadge } from "./live.js";
import { drawStudentCurve } from "./student-curve.js";

const config = pageConfig();
const base = config.api;
const ACTIVE = new Set(["queued", "running"]);
const POLL_MS = 3000;

const ui = {
  start: document.getElementById("start-round"),
  cancel: document.getElementById("cancel-round"),
  live: document.getElementById("round-live"),
  liveNumber: document.getElementById("live-number"),
  liveState: document.getElementById("live-state"),
  liveProgress: document.getElementById("live-progress"),
  livePercent: document.getElementById("live-percent"),
  liveStage: document.getElementById("live-stage"),
  roundsError: document.getElementById("rounds-error"),
  roundsBody: document.querySelector("#rounds-table tbody"),
  curve: document.getElementById("learning-curve"),
  curveNote: document.getElementById("curve-note"),
  confusion: document.getElementById("confusion"),
  queue: document.getElementById("queue-figures"),
  slidesBody: document.querySelector("#slides-table tbody"),
  agreementFigures: document.getElementById("agreement-figures"),
  agreementBody: document.querySelector("#agreement-table tbody"),
  provenanceBody: document.querySelector("#provenance-table tbody"),
  speedModes: document.querySelector("#speed-modes tbody"),
  speedAnnotators: document.querySelector("#speed-annotators tbody"),
  speedModelNote: document.getElementById("speed-model-note"),
  weightForm: document.getElementById("suggestion-weight-form"),
  weightInput: document.getElementById("suggestion-weight"),
  weightMessage: document.getElementById("suggestion-weight-message"),
  studentsBody: document.querySelector("#students-table tbody"),
  studentCurve: document.getElementById("student-curve"),
  studentCurveName: document.getElementById("student-curve-name"),
  studentForm: document.getElementById("student-settings-form"),
  adaptiveGold: document.getElementById("adaptive-gold"),
  certification: document.getElementById("certification-threshold"),
  studentMessage: document.getElementById("student-settings-message"),
  routingForm: document.getElementById("expert-routing-form"),
  routingSelect: document.getElementById("expert-routing"),
  routingMessage: document.getElementById("expert-routing-message"),
};

// How a vote was made (Vote.Provenance), in words.
const MODES = {
  manual: "One at a time",
  bulk: "Lasso (bulk)",
  "accepted-suggestion": "Accepted suggestion",
  similar: "More like this",
  "label-import": "Label file import",
  "region-import": "Region import",
};
const modeName = (mode) => MODES[mode] || mode;
const percent = (share) => (share === null || share === undefined ? "–" : `${Math.round(share * 100)}%`);

const state = { rounds: [], roundsAvailable: true, plot: null, live: null, pollTimer: null, slidesTimer: null, agreementTimer: null, studentPlot: null, student: null };
window.histoloopDashboard = state;

const fmt = (value, digits = 3) => (value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

function seconds(round) {
  if (!round.started_at || !round.finished_at) return "–";
  return `${Math.round((new Date(round.finished_at) - new Date(round.started_at)) / 1000)} s`;
}

function message(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

function figure(term, value) {
  return el("div", {}, el("dt", { text: term }), el("dd", { text: value }));
}

function placeholder(body, columns, text, cls = "note") {
  body.replaceChildren(el("tr", {}, el("td", { colspan: columns, class: cls, text })));
}

// --- rounds ---

function renderLive(round) {
  if (!round) {
    ui.live.hidden = true;
    if (ui.cancel) ui.cancel.hidden = true;
    return;
  }
  ui.live.hidden = false;
  ui.live.dataset.round = round.id;
  ui.live.dataset.state = round.state;
  ui.liveNumber.textContent = round.number ?? round.id;
  ui.liveState.textContent = round.state;
  ui.liveState.dataset.state = round.state;
  const percent = Math.round(Number(round.progress) || 0);
  ui.liveProgress.value = percent;
  ui.livePercent.textContent = `${percent}%`;
  ui.liveStage.textContent = round.error ? round.error : round.stage || "";
  const active = ACTIVE.has(round.state) || round.state === "starting";
  if (ui.cancel) ui.cancel.hidden = !ACTIVE.has(round.state);
  if (ui.start) ui.start.disabled = active || !state.roundsAvailable;
}

function renderRounds() {
  const rounds = [...state.rounds].sort((a, b) => b.number - a.number);
  if (!rounds.length) {
    placeholder(ui.roundsBody, 12, "No rounds yet. Label some patches, then start a round.");
  } else {
    ui.roundsBody.replaceChildren(
      ...rounds.map((r) => {
        const m = r.metrics || {};
        return el(
          "tr",
          { dataset: { round: r.id, state: r.state } },
          el("td", { text: r.number }),
          el("td", {}, el("span", { class: "state", dataset: { state: r.state }, text: r.state })),
          el("td", { text: r.strategy || "–" }),
          el("td", { text: r.train_mode || "–" }),
          el("td", { class: "num", text: r.n_labels ?? "–" }),
          el("td", { class: "num", text: fmt(m.balanced_accuracy) }),
          el("td", { class: "num", text: fmt(m.macro_f1) }),
          el("td", { class: "num", text: fmt(m.roc_auc) }),
          el("td", { class: "num", text: fmt(m.kappa) }),
          el("td", { text: when(r.started_at || r.created_at) }),
          el("td", { class: "num", text: seconds(r) }),
          el("td", { class: r.error ? "error" : "note", text: r.error || (ACTIVE.has(r.state) ? `${r.stage || ""} ${Math.round(r.progress || 0)}%` : "") }),
        );
      }),
    );
  }
  const active = rounds.find((r) => ACTIVE.has(r.state));
  renderLive(active || (state.live && rounds.find((r) => r.id === state.live)) || null);
  state.plot = drawLearningCurve(ui.curve, rounds, state.plot);
  ui.curveNote.textContent = state.plot ? "" : "The curve appears after the first successful round.";
  renderConfusion(rounds.find((r) => r.state === "succeeded" && r.metrics && r.metrics.confusion_matrix));
  schedulePoll(Boolean(active));
}

function renderConfusion(round) {
  if (!round) {
    ui.confusion.replaceChildren(el("p", { class: "note", text: "No model yet." }));
    return;
  }
  const matrix = round.metrics.confusion_matrix;
  const names = round.metrics.class_names || matrix.map((_, i) => `class ${i}`);
  const header = el("tr", {}, el("th", { scope: "col", text: "True \\ predicted" }), names.map((n) => el("th", { scope: "col", class: "num", text: n })));
  const rows = matrix.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el(
      "tr",
      {},
      el("th", { scope: "row", text: names[i] }),
      row.map((count, j) => {
        const share = count / total;
        const colour = i === j ? `rgba(27, 127, 59, ${0.1 + share * 0.6})` : `rgba(164, 22, 26, ${share * 0.6})`;
        return el("td", { class: "num", style: `background: ${colour}`, title: `${Math.round(share * 100)}% of ${names[i]}`, text: count });
      }),
    );
  });
  ui.confusion.replaceChildren(
    el("p", { class: "note", text: `Round ${round.number}, ${round.n_labels} labels.` }),
    el("table", { class: "data confusion", id: "confusion-table" }, el("thead", {}, header), el("tbody", {}, rows)),
  );
}

async function loadRounds() {
  let body;
  try {
    body = await api(`${base}rounds/`);
  } catch (error) {
    if (error.status === 404) {
      state.roundsAvailable = false;
      if (ui.start) ui.start.disabled = true;
      message(ui.roundsError, "Training rounds are not available on this server yet (no rounds API). Labelling still works.");
      placeholder(ui.roundsBody, 12, "–");
    } else {
      message(ui.roundsError, error.message);
    }
    return;
  }
  state.roundsAvailable = true;
  state.rounds = Array.isArray(body) ? body : body.results || [];
  renderRounds();
}

function upsertRound(update) {
  const patch = Object.fromEntries(Object.entries(update).filter(([, value]) => value !== undefined));
  const index = state.rounds.findIndex((r) => r.id === patch.id);
  if (index >= 0) state.rounds[index] = { ...state.rounds[index], ...patch };
  else state.rounds.push({ number: patch.id, metrics: {}, ...patch });
}

// The websocket is the main channel; polling covers a dropped connection while a round runs.
function schedulePoll(active) {
  clearTimeout(state.pollTimer);
  if (!active) return;
  state.pollTimer = setTimeout(() => {
    if (!state.socket || !state.socket.connected) loadRounds();
    else schedulePoll(true);
  }, POLL_MS);
}

async function startRound() {
  message(ui.roundsError, "");
  ui.start.disabled = true;
  renderLive({ id: "", number: "…", state: "starting", progress: 0, stage: "asking the server" });
  let round;
  try {
    round = await api(`${base}rounds/`, { method: "POST" });
  } catch (error) {
    message(ui.roundsError, error.message);
    ui.start.disabled = false;
    renderRounds();
    if (error.status === 409) loadRounds();
    return;
  }
  state.live = round.id;
  upsertRound(round);
  renderRounds();
}

async function cancelRound() {
  const round = state.rounds.find((r) => ACTIVE.has(r.state));
  if (!round) return;
  try {
    await api(`${base}rounds/${round.id}/cancel/`, { method: "POST" });
  } catch (error) {
    message(ui.roundsError, error.message);
    return;
  }
  loadRounds();
}

// --- queue, slides, agreement ---

async function loadStats() {
  let stats;
  try {
    stats = await api(`${base}stats/`);
  } catch (error) {
    ui.queue.replaceChildren(el("p", { class: "error", text: error.message }));
    return;
  }
  const consensus = stats.consensus || {};
  ui.queue.replaceChildren(
    figure("Open crowd tasks", stats.queue.open),
    figure("Leased now", stats.queue.leased),
    figure("Done", stats.queue.done),
    figure("Expert review", stats.queue.expert_open),
    figure("Gold patches", stats.queue.gold_patches),
    figure("Patches", stats.patches ?? "–"),
    figure("Votes", stats.votes ?? "–"),
    figure("Annotators", stats.annotators ?? "–"),
    figure("Labelled", stats.labelled ?? "–"),
    figure("Contested", consensus.contested ?? 0),
  );
}

async function loadSlides() {
  clearTimeout(state.slidesTimer);
  let body;
  try {
    body = await api(`${base}slides/?limit=500`);
  } catch (error) {
    placeholder(ui.slidesBody, 6, error.message, "error");
    return;
  }
  const slides = Array.isArray(body) ? body : body.results || [];
  if (!slides.length) {
    placeholder(ui.slidesBody, 6, "No slides yet.");
    return;
  }
  ui.slidesBody.replaceChildren(
    ...slides.map((s) =>
      el(
        "tr",
        { dataset: { slide: s.id, status: s.status } },
        el("td", {}, s.thumbnail_url ? el("img", { class: "thumb", src: s.thumbnail_url, alt: "", loading: "lazy" }) : ""),
        el("td", {}, s.status === "ready" ? el("a", { href: `/projects/${config.project.id}/viewer/${s.id}/`, text: s.name }) : s.name),
        el("td", {}, el("span", { class: "state", dataset: { state: s.status === "ready" ? "succeeded" : s.status }, text: s.status })),
        el("td", { class: "num", text: s.patch_count ?? "–" }),
        el("td", { text: s.width ? `${s.width} × ${s.height}${s.mpp ? `, ${Number(s.mpp).toFixed(3)} µm/px` : ""}` : "–" }),
        el("td", { class: s.error ? "error" : "note", text: s.error || s.message || "" }),
      ),
    ),
  );
  // Slides being processed change state on their own: look again in a while.
  if (slides.some((s) => s.status === "processing")) state.slidesTimer = setTimeout(loadSlides, 5000);
}

async function loadAgreement() {
  let report;
  try {
    report = await api(`${base}agreement/`);
  } catch (error) {
    placeholder(ui.agreementBody, 5, error.status === 404 ? "Agreement reports are not available on this server yet." : error.message, "error");
    return;
  }
  clearTimeout(state.agreementTimer);
  if (!report.labels) {
    // 202: a large project's first report is being computed on the worker. Look again in a while.
    placeholder(ui.agreementBody, 5, report.detail || "The agreement report is being computed.");
    state.agreementTimer = setTimeout(loadAgreement, 5000);
    return;
  }
  // A large project's report is the last one the worker computed: say when, and look again once a newer is on its way.
  if (report.refreshing) state.agreementTimer = setTimeout(loadAgreement, 10000);
  ui.agreementFigures.replaceChildren(
    figure("Fleiss' κ (crowd)", fmt(report.fleiss_kappa)),
    figure("Krippendorff's α", fmt(report.krippendorff_alpha)),
    figure("Computed", `${when(report.computed_at)}${report.refreshing ? " (refreshing)" : ""}`),
  );
  renderProvenance(report.provenance || []);
  const annotators = report.annotators || [];
  if (!annotators.length) {
    placeholder(ui.agreementBody, 5, "No votes yet.");
    return;
  }
  ui.agreementBody.replaceChildren(
    ...annotators.map((a) =>
      el(
        "tr",
        {},
        el("th", { scope: "row", text: a.username }),
        el("td", { text: a.role || "–" }),
        el("td", { class: "num", text: a.n_votes }),
        el("td", { class: "num", text: fmt(a.cohen_kappa_vs_experts) }),
        el("td", { class: "num", text: a.gold_accuracy === null || a.gold_accuracy === undefined ? "–" : `${Math.round(a.gold_accuracy * 100)}%` }),
      ),
    ),
  );
}

function pairCell(score) {
  if (!score || !score.n_pairs) return el("td", { class: "num note", text: "–" });
  const kappa = score.kappa === null || score.kappa === undefined ? "" : `, κ ${fmt(score.kappa, 2)}`;
  return el("td", { class: "num", title: `${score.n_pairs} pairs`, text: `${percent(score.agreement)}${kappa} (${score.n_pairs})` });
}

function renderProvenance(rows) {
  if (!rows.length) {
    placeholder(ui.provenanceBody, 6, "No votes yet.");
    return;
  }
  ui.provenanceBody.replaceChildren(
    ...rows.map((row) =>
      el(
        "tr",
        { dataset: { provenance: row.provenance } },
        el("th", { scope: "row", text: modeName(row.provenance) }),
        el("td", { class: "num", text: row.n_votes }),
        el("td", { class: "num", text: row.n_annotators }),
        pairCell(row.vs_consensus),
        pairCell(row.vs_experts),
        pairCell(row.vs_independent),
      ),
    ),
  );
}

// --- labelling speed ---

const duration = (seconds) => (seconds < 3600 ? `${(seconds / 60).toFixed(1)} min` : `${(seconds / 3600).toFixed(1)} h`);
const perHour = (value) => (value === null || value === undefined ? "–" : Math.round(value).toLocaleString());

async function loadSpeed() {
  let body;
  try {
    body = await api(`${base}labelling-speed/`);
  } catch (error) {
    placeholder(ui.speedModes, 5, error.message, "error");
    return;
  }
  const latest = body.latest_model;
  const shares = (latest && latest.shares) || {};
  const modes = new Set([...Object.keys(body.modes || {}), ...Object.keys(shares)]);
  if (!modes.size) {
    placeholder(ui.speedModes, 5, "No labels in this period yet.");
  } else {
    ui.speedModes.replaceChildren(
      ...[...modes].sort().map((mode) => {
        const row = (body.modes || {})[mode];
        return el(
          "tr",
          { dataset: { mode } },
          el("th", { scope: "row", text: modeName(mode) }),
          el("td", { class: "num", text: row ? row.labels : "–" }),
          el("td", { class: "num", text: row ? duration(row.seconds) : "–" }),
          el("td", { class: "num", dataset: { field: "per-hour" }, text: row ? perHour(row.per_hour) : "–" }),
          el("td", { class: "num", dataset: { field: "share" }, text: latest && latest.shares ? percent(shares[mode] || 0) : "–" }),
        );
      }),
    );
  }
  ui.speedModelNote.textContent = !latest
    ? "No model yet: the share of each mode appears after the first trained round."
    : latest.shares
      ? `Shares: the active votes behind the ${latest.n_labels} labels round ${latest.round} trained on, by mode.`
      : `Round ${latest.round} ran before modes were recorded; the next round records them.`;
  const people = body.annotators || [];
  if (!people.length) {
    placeholder(ui.speedAnnotators, 4, "No labels in this period yet.");
    return;
  }
  ui.speedAnnotators.replaceChildren(
    ...people.flatMap((person) =>
      Object.entries(person.modes).map(([mode, row], i) =>
        el(
          "tr",
          { dataset: { annotator: person.username, mode } },
          i === 0 ? el("th", { scope: "row", rowspan: Object.keys(person.modes).length, text: person.username }) : null,
          el("td", { text: modeName(mode) }),
          el("td", { class: "num", text: row.labels }),
          el("td", { class: "num", dataset: { field: "per-hour" }, text: perHour(row.per_hour) }),
        ),
      ),
    ),
  );
}

// --- the suggestion weight (admins) ---

async function loadWeight() {
  if (!ui.weightForm) return;
  try {
    const project = await api(base);
    ui.weightInput.value = project.suggestion_weight;
    if (ui.routingSelect) ui.routingSelect.value = project.expert_routing;
    // The current values are shown: the forms may be used now (they are disabled until then).
    for (const form of [ui.weightForm, ui.routingForm]) {
      const fieldset = form && form.querySelector("fieldset");
      if (fieldset) fieldset.disabled = false;
    }
  } catch (error) {
    message(ui.weightMessage, error.message);
  }
}

async function saveRouting(event) {
  event.preventDefault();
  ui.routingMessage.classList.remove("error");
  try {
    const project = await api(base, { method: "PATCH", body: { expert_routing: ui.routingSelect.value } });
    ui.routingSelect.value = project.expert_routing;
    message(ui.routingMessage, `Saved: the next round routes by ${project.expert_routing === "value" ? "expected value per cost" : "crowd first"}.`);
  } catch (error) {
    ui.routingMessage.classList.add("error");
    message(ui.routingMessage, error.message);
  }
}

async function saveWeight(event) {
  event.preventDefault();
  ui.weightMessage.classList.remove("error");
  let project;
  try {
    project = await api(base, { method: "PATCH", body: { suggestion_weight: ui.weightInput.value === "" ? null : Number(ui.weightInput.value) } });
  } catch (error) {
    ui.weightMessage.classList.add("error");
    message(ui.weightMessage, error.message);
    return;
  }
  ui.weightInput.value = project.suggestion_weight;
  message(
    ui.weightMessage,
    project.consensus_recompute === "queued"
      ? `Saved: weight ${project.suggestion_weight}. The worker is recomputing the project's consensus.`
      : `Unchanged: the weight was already ${project.suggestion_weight}.`,
  );
}

// --- students: gold answers, certification, learning curves ---

async function loadStudents() {
  let body;
  try {
    body = await api(`${base}students/`);
  } catch (error) {
    placeholder(ui.studentsBody, 6, error.message, "error");
    return;
  }
  if (!body.students.length) {
    placeholder(ui.studentsBody, 6, "No students in this project yet.");
    return;
  }
  const certified = (s) => (s.certified === null ? "– (off)" : s.certified ? "yes" : s.gold_answers < body.min_gold_answers ? `no (${s.gold_answers} of ${body.min_gold_answers} gold answers)` : "no");
  ui.studentsBody.replaceChildren(
    ...body.students.map((s) =>
      el(
        "tr",
        { dataset: { student: s.username, certified: String(s.certified) } },
        el("th", { scope: "row", text: s.username }),
        el("td", { class: "num", text: s.gold_answers }),
        el("td", { class: "num", text: percent(s.gold_accuracy) }),
        el("td", { class: "num", text: percent(s.gold_rate) }),
        el("td", { dataset: { field: "certified" }, text: certified(s) }),
        el("td", {}, el("button", { type: "button", class: "link-button", onclick: () => loadStudentCurve(s), text: "Show" })),
      ),
    ),
  );
  const again = state.student && body.students.find((s) => s.user === state.student.user);
  loadStudentCurve(again || body.students[0]);
}

async function loadStudentCurve(student) {
  state.student = student;
  ui.studentCurveName.textContent = student.username;
  let body;
  try {
    body = await api(`${base}students/${student.user}/learning-curve/?block=25`);
  } catch (error) {
    ui.studentCurve.replaceChildren(el("p", { class: "error", text: error.message }));
    return;
  }
  state.studentPlot = drawStudentCurve(ui.studentCurve, body, state.studentPlot);
}

async function loadStudentSettings() {
  if (!ui.studentForm) return;
  try {
    const project = await api(base);
    ui.adaptiveGold.checked = project.adaptive_gold;
    ui.certification.value = project.certification_threshold;
  } catch (error) {
    message(ui.studentMessage, error.message);
  }
}

async function saveStudentSettings(event) {
  event.preventDefault();
  ui.studentMessage.classList.remove("error");
  let project;
  try {
    const threshold = ui.certification.value === "" ? null : Number(ui.certification.value);
    project = await api(base, { method: "PATCH", body: { adaptive_gold: ui.adaptiveGold.checked, certification_threshold: threshold } });
  } catch (error) {
    ui.studentMessage.classList.add("error");
    message(ui.studentMessage, error.message);
    return;
  }
  ui.adaptiveGold.checked = project.adaptive_gold;
  ui.certification.value = project.certification_threshold;
  const recompute = project.consensus_recompute === "queued" ? " The worker is recomputing the project's consensus." : "";
  message(ui.studentMessage, `Saved: adaptive gold ${project.adaptive_gold ? "on" : "off"}, certification threshold ${project.certification_threshold}.${recompute}`);
  loadStudents();
}

// --- live events ---

function onEvent(event) {
  if (event.type === "round.progress") {
    upsertRound({ id: event.round, state: event.state, stage: event.stage, progress: event.progress });
    state.live = event.round;
    renderRounds();
  } else if (event.type === "round.finished") {
    upsertRound({ id: event.round, state: event.state, error: event.error || "", progress: event.state === "succeeded" ? 100 : undefined });
    state.live = event.round;
    renderRounds();
    // The finished round brings metrics, new tasks and maybe new agreement figures.
    loadRounds();
    loadStats();
    loadAgreement();
    loadSpeed();
    loadStudents();
  } else if (event.type === "queue.refresh") {
    loadStats();
  }
}

if (ui.start) ui.start.addEventListener("click", startRound);
if (ui.weightForm) ui.weightForm.addEventListener("submit", saveWeight);
if (ui.studentForm) ui.studentForm.addEventListener("submit", saveStudentSettings);
if (ui.routingForm) ui.routingForm.addEventListener("submit", saveRouting);
if (ui.cancel) ui.cancel.addEventListener("click", cancelRound);
window.addEventListener("resize", () => {
  if (state.plot) state.plot.setSize({ width: Math.max(320, ui.curve.clientWidth), height: 260 });
});

state.socket = connectLive(config.ws, {
  onEvent,
  onStatus(status) {
    statusBadge(document.getElementById("live-status"))(status);
    // After a reconnect, catch up on anything missed while the socket was down.
    if (status === "open" && state.hadSocket) {
      loadRounds();
      loadStats();
    }
    if (status === "open") state.hadSocket = true;
  },
});

loadRounds();
loadStats();
loadSlides();
loadAgreement();
loadSpeed();
loadWeight();
loadStudents();
loadStudentSettings();
