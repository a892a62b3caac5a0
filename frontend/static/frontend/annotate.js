// The annotator: one leased patch at a time, labelled with keys 1-9, S to skip, U / Ctrl+Z to undo.
//
// The user holds one lease ahead (next-task/?ahead=1, and each vote sent with "ahead": true brings
// a fresh one), whose images are fetched and decoded off-screen while the person looks at the
// current patch. A label key swaps the decoded next patch in at once; the vote goes to the server
// in the background, one request after another (state.background). When no task is ready ahead
// (the server had none to lease), the vote is sent with "next": true and the page waits for it.
import { api, el, isTyping, pageConfig, paintLabelColours } from "./api.js";
import { connectLive, statusBadge } from "./live.js";
import { similarPanel } from "./similar-panel.js";
import { drawStudentCurve } from "./student-curve.js";

const config = pageConfig();
paintLabelColours();
const base = config.api;
const labelsByHotkey = new Map(config.labels.map((label) => [label.hotkey, label]));
const contextMargin = config.project.patch_size;
const IDLE_POLL_MS = 30000;

const ui = {
  root: document.getElementById("annotator"),
  patchImg: document.getElementById("patch-img"),
  contextImg: document.getElementById("context-img"),
  caption: document.getElementById("patch-caption"),
  empty: document.getElementById("empty-queue"),
  labelButtons: [...document.querySelectorAll(".label-button")],
  skip: document.getElementById("skip-button"),
  undo: document.getElementById("undo-button"),
  status: document.getElementById("status"),
  error: document.getElementById("error"),
  gold: document.getElementById("gold-feedback"),
  crowdVotes: document.getElementById("crowd-votes"),
  crowdVotesList: document.getElementById("crowd-votes-list"),
  stats: {
    today: document.getElementById("stat-today"),
    total: document.getElementById("stat-total"),
    queue: document.getElementById("stat-queue"),
    expert: document.getElementById("stat-expert"),
  },
};

const state = {
  task: null,
  shownAt: 0,
  busy: false,
  idle: false,
  canUndo: false,
  idleTimer: null,
  entry: null, // the task on screen with its decoded images, to show again after an undo
  ahead: [], // leased tasks to show next, images decoding ({task, patch, context})
  background: Promise.resolve(), // votes, skips and top-ups, sent one after another
};

// Read by the end-to-end tests and the benchmark: one entry per vote, in milliseconds.
const metrics = { votes: [] };
window.histoloopMetrics = metrics;

function setState(name) {
  ui.root.dataset.state = name;
}

function setControls(enabled) {
  const canLabel = enabled && state.task !== null;
  for (const button of ui.labelButtons) button.disabled = !canLabel;
  ui.skip.disabled = !canLabel;
  ui.undo.disabled = !(enabled && state.canUndo);
}

function showError(error) {
  ui.error.textContent = error.message || String(error);
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function say(text) {
  ui.status.textContent = text;
}

function imageUrls(task) {
  return {
    patch: task.patch.image_url,
    context: `/api/v1/patches/${task.patch.id}/image.jpeg?context=${contextMargin}`,
  };
}

// A frame containing the new image has been produced once rAF has run and the task after it.
function nextPaint() {
  return new Promise((resolve) => {
    requestAnimationFrame(() => {
      const channel = new MessageChannel();
      channel.port1.onmessage = () => resolve();
      channel.port2.postMessage(null);
    });
  });
}

function adopt(visible, loaded) {
  loaded.id = visible.id;
  loaded.alt = visible.alt;
  loaded.width = visible.width;
  loaded.height = visible.height;
  visible.replaceWith(loaded);
  return loaded;
}

async function decoded(url) {
  const image = new Image();
  image.decoding = "async";
  image.src = url;
  await image.decode();
  return image;
}

// Starts fetching and decoding a task's images off-screen.
function preload(task) {
  const urls = imageUrls(task);
  const entry = { task, patch: decoded(urls.patch), context: decoded(urls.context) };
  // A failure is reported when the task is shown, not as an unhandled rejection meanwhile.
  entry.patch.catch(() => {});
  entry.context.catch(() => {});
  return entry;
}

// Remembers a task leased ahead (once) and starts decoding its images.
function keepAhead(task) {
  if (!task || (state.task && state.task.id === task.id)) return;
  if (state.ahead.some((entry) => entry.task.id === task.id)) return;
  state.ahead.push(preload(task));
}

function inBackground(job) {
  state.background = state.background.then(job).catch((error) => showError(error));
  return state.background;
}

// Puts the task's images on screen; resolves once the patch is painted. The context image is
// swapped in when it has decoded too, without holding the patch back.
async function showImages(task, entry) {
  state.entry = entry && entry.task === task ? entry : preload(task);
  const context = state.entry.context;
  let patch;
  try {
    patch = await state.entry.patch;
  } catch {
    throw new Error("The patch image could not be loaded; skip it or reload the page.");
  }
  ui.patchImg = adopt(ui.patchImg, patch);
  context.then(
    (image) => {
      if (state.task === task) ui.contextImg = adopt(ui.contextImg, image);
    },
    () => {
      if (state.task === task) ui.contextImg.removeAttribute("src");
    },
  );
  await nextPaint();
}

async function present(task, timing, entry) {
  // A task shown now is no longer ahead; its images may be decoded already.
  const index = state.ahead.findIndex((e) => e.task.id === task.id);
  if (index >= 0) {
    const [queued] = state.ahead.splice(index, 1);
    if (!entry) {
      entry = queued;
      task = queued.task;
    }
  }
  state.task = task;
  state.idle = false;
  clearTimeout(state.idleTimer);
  ui.empty.hidden = true;
  ui.crowdVotes.hidden = true;
  const imagesStart = performance.now();
  try {
    await showImages(task, entry);
  } catch (error) {
    showError(error);
  }
  const now = performance.now();
  state.shownAt = now;
  ui.patchImg.dataset.patch = task.patch.id;
  ui.patchImg.dataset.task = task.id;
  ui.caption.textContent = `Patch ${task.patch.id} of ${task.patch.slide_name}`;
  ui.root.dataset.task = task.id;
  ui.root.dataset.patch = task.patch.id;
  if (timing) {
    metrics.votes.push({
      latency: now - timing.pressed,
      vote: timing.voted - timing.pressed,
      next: imagesStart - timing.voted,
      images: now - imagesStart,
      ahead: Boolean(timing.ahead), // swapped in from the task decoded ahead
    });
  }
  setState("ready");
  if (task.kind === "expert") showCrowdVotes(task);
}

function showEmpty() {
  state.task = null;
  state.idle = true;
  ui.empty.hidden = false;
  ui.crowdVotes.hidden = true;
  ui.caption.textContent = "No patch to label.";
  ui.patchImg.removeAttribute("src");
  ui.contextImg.removeAttribute("src");
  delete ui.root.dataset.task;
  delete ui.root.dataset.patch;
  setState("empty");
  // The websocket normally wakes us up; a slow poll covers a missed event.
  clearTimeout(state.idleTimer);
  state.idleTimer = setTimeout(() => fetchNext(), IDLE_POLL_MS);
}

async function fetchNext(timing) {
  let task;
  try {
    task = await api(`${base}next-task/?ahead=1`, { method: "POST" });
  } catch (error) {
    showError(error);
    setState("error");
    return;
  }
  if (task === null) showEmpty();
  else await present(task, timing);
  if (task) keepAhead(task.ahead);
}

// Leases a task to hold ahead. The answer's own task is the user's oldest lease, mostly
// the one on screen; keepAhead ignores that one.
async function topUp() {
  let body;
  try {
    body = await api(`${base}next-task/?ahead=1`, { method: "POST" });
  } catch (error) {
    showError(error);
    return;
  }
  if (body) {
    keepAhead(body);
    keepAhead(body.ahead);
  }
}

async function run(action) {
  if (state.busy) return;
  state.busy = true;
  setControls(false);
  setState("busy");
  try {
    await action();
  } finally {
    state.busy = false;
    setControls(true);
    if (ui.root.dataset.state === "busy") setState(state.task ? "ready" : "empty");
  }
  refreshStats();
}

// The task decoded ahead is shown at once and the vote goes to the server in the background;
// with nothing held ahead, the vote also asks for the next task and the page waits for it.
function vote(label) {
  const task = state.task;
  if (!task || state.busy) return;
  const pressed = performance.now();
  const timeSpent = Math.round(pressed - state.shownAt);
  return run(async () => {
    // A vote still on its way may bring the task to show next.
    if (!state.ahead.length) await state.background;
    const next = state.ahead.shift();
    if (next) {
      state.canUndo = true;
      inBackground(async () => {
        // The person is on the next patch already: a failure is said and they carry on.
        const sent = await sendVote(task, label, timeSpent, { next: false });
        if (!sent.ok) return;
        keepAhead(sent.result.ahead);
        refreshStats();
        if (!state.busy) setControls(true);
      });
      await present(next.task, { pressed, voted: pressed, ahead: true }, next);
      return;
    }
    const sent = await sendVote(task, label, timeSpent, { next: true });
    if (!sent.ok) {
      // 409: the lease expired or the patch was voted meanwhile; move on to a fresh task.
      if (sent.status === 409) await fetchNext();
      return;
    }
    state.canUndo = true;
    if (!sent.result.next) {
      showEmpty();
      return;
    }
    await present(sent.result.next, { pressed, voted: sent.at });
    keepAhead(sent.result.ahead);
  });
}

// The one vote request. It always asks for a fresh lease to hold ahead ("ahead": true), and with
// `next` also for the task to show next. Resolves to {ok, result, at} or, after saying what went
// wrong, to {ok: false, status}.
async function sendVote(task, label, timeSpent, { next }) {
  const body = { patch: task.patch.id, label: label.id, task: task.id, time_spent_ms: timeSpent, ahead: true };
  if (next) body.next = true;
  let result;
  try {
    result = await api(`${base}votes/`, { method: "POST", body });
  } catch (error) {
    showError(error);
    return { ok: false, status: error.status };
  }
  const at = performance.now();
  clearError();
  showGold(result.gold);
  say(`Labelled patch ${task.patch.id} as ${label.name}.`);
  return { ok: true, result, at };
}

// Resolves to true once the task is given back (or was not ours any more, which is what a skip
// wants: 409), false after saying why it could not be.
async function sendSkip(task) {
  try {
    await api(`${base}tasks/${task.id}/skip/`, { method: "POST" });
  } catch (error) {
    showError(error);
    if (error.status !== 409) return false;
  }
  clearError();
  say(`Skipped patch ${task.patch.id}.`);
  return true;
}

// The task decoded ahead is shown at once; the skip and a new lease ahead follow.
function skip() {
  const task = state.task;
  if (!task || state.busy) return;
  return run(async () => {
    if (!state.ahead.length) await state.background;
    const next = state.ahead.shift();
    if (next) {
      inBackground(async () => {
        if (await sendSkip(task)) await topUp();
      });
      await present(next.task, undefined, next);
      return;
    }
    if (await sendSkip(task)) await fetchNext();
  });
}

function undo() {
  if (!state.canUndo) return;
  return run(async () => {
    // The vote to undo may still be on its way.
    await state.background;
    let result;
    try {
      result = await api(`${base}votes/undo/`, { method: "POST" });
    } catch (error) {
      showError(error);
      if (error.status === 400) state.canUndo = false;
      return;
    }
    clearError();
    ui.gold.hidden = true;
    if (result.task) {
      say(`Vote on patch ${result.task.patch.id} undone; label it again.`);
      if (state.task && state.task.id !== result.task.id) {
        // The patch on screen comes back right after the undone one, images still decoded.
        state.ahead.unshift(state.entry && state.entry.task === state.task ? state.entry : preload(state.task));
      }
      await present(result.task);
    } else {
      say("Your last vote was undone.");
    }
  });
}

// Training mode, students: their own learning curve, drawn again after each gold answer and when opened.
const progress = {
  root: document.getElementById("my-progress"),
  curve: document.getElementById("my-progress-curve"),
  summary: document.getElementById("my-progress-summary"),
  plot: null,
};

async function loadProgress() {
  if (!progress.root || !progress.root.open) return;
  let body;
  try {
    body = await api(`${base}my-progress/?block=25`);
  } catch (error) {
    progress.curve.replaceChildren(el("p", { class: "error", text: error.message }));
    return;
  }
  const me = body.me || {};
  const share = me.gold_accuracy === null || me.gold_accuracy === undefined ? "–" : `${Math.round(me.gold_accuracy * 100)}%`;
  const certified = me.certified === null || me.certified === undefined ? "" : me.certified ? " Certified: your votes count." : " Not certified yet: your votes are recorded, not counted.";
  progress.summary.textContent = `Check patches: ${me.gold_correct ?? 0} of ${me.gold_answers ?? 0} right (${share}).${certified}`;
  progress.plot = drawStudentCurve(progress.curve, body, progress.plot);
}

if (progress.root) progress.root.addEventListener("toggle", loadProgress);

function showGold(gold) {
  if (!gold) {
    ui.gold.hidden = true;
    return;
  }
  loadProgress();
  ui.gold.hidden = false;
  ui.gold.dataset.correct = gold.correct ? "true" : "false";
  ui.gold.textContent = gold.correct
    ? `Correct: this was a check patch and the experts also said ${gold.expert_label}.`
    : `Check patch: the experts labelled this ${gold.expert_label}.`;
}

async function showCrowdVotes(task) {
  let detail;
  try {
    detail = await api(`${base}patches/${task.patch.id}/`);
  } catch (error) {
    showError(error);
    return;
  }
  if (state.task !== task) return;
  const votes = (detail.votes || []).filter((v) => v.is_active && v.role === "crowd");
  ui.crowdVotesList.replaceChildren(
    ...(votes.length
      ? votes.map((v) => el("li", {}, el("span", { class: "who", text: v.annotator }), ": ", v.label_name))
      : [el("li", { text: "No crowd votes on this patch." })]),
  );
  ui.crowdVotes.hidden = false;
}

let statsTimer = null;
function refreshStats() {
  clearTimeout(statsTimer);
  // Stats are secondary: fetch them after the patch is on screen, at most a few times a second.
  statsTimer = setTimeout(async () => {
    try {
      const stats = await api(`${base}stats/`);
      ui.stats.today.textContent = stats.my_votes_today;
      ui.stats.total.textContent = stats.my_votes_total;
      ui.stats.queue.textContent = stats.queue.open;
      if (ui.stats.expert) ui.stats.expert.textContent = stats.queue.expert_open;
    } catch {
      // Leave the last figures; the next vote tries again.
    }
  }, 250);
}

document.addEventListener("keydown", (event) => {
  if (event.repeat || event.altKey || isTyping(event.target)) return;
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && key === "z") {
    event.preventDefault();
    undo();
    return;
  }
  if (event.ctrlKey || event.metaKey) return;
  const label = labelsByHotkey.get(event.key);
  if (label) {
    event.preventDefault();
    vote(label);
  } else if (key === "s") {
    event.preventDefault();
    skip();
  } else if (key === "u") {
    event.preventDefault();
    undo();
  } else if (key === "m") {
    event.preventDefault();
    similar.toggle();
  }
});

const similar = similarPanel({
  base,
  labels: config.labels,
  canLabel: Boolean(config.can_label_many),
  patchId: () => ui.root.dataset.patch,
});

for (const button of ui.labelButtons) {
  const label = config.labels.find((l) => String(l.id) === button.dataset.label);
  button.addEventListener("click", () => vote(label));
}
ui.skip.addEventListener("click", () => skip());
ui.undo.addEventListener("click", () => undo());

window.histoloopLive = connectLive(config.ws, {
  onStatus: statusBadge(document.getElementById("live-status")),
  onEvent(event) {
    // A finished round rebuilds the queue: an idle annotator asks again at once.
    if ((event.type === "queue.refresh" || event.type === "round.finished") && state.idle && !state.busy) {
      run(() => fetchNext());
    } else if (event.type === "queue.refresh" && state.task && !state.ahead.length) {
      // Nothing was left to hold ahead; there may be now.
      inBackground(topUp);
    }
  },
});

run(() => fetchNext());
