// The learning curve: labels used vs balanced accuracy / ROC AUC, strategy arm and random arm (uPlot).
import { chartLine } from "./chart-line.js";

const COLOURS = { strategy: "#7b2d6b", random: "#7a7a86" };

function armPoints(rounds, arm) {
  // One point per distinct label count; a later round with the same count replaces an earlier one.
  const byLabels = new Map();
  for (const round of rounds) {
    const metrics = round.metrics || {};
    const figures = (metrics.arms && metrics.arms[arm]) || (arm === "strategy" ? { ...metrics, n_labels: round.n_labels } : null);
    if (!figures || figures.n_labels === undefined || figures.n_labels === null) continue;
    byLabels.set(figures.n_labels, [figures.balanced_accuracy ?? null, figures.roc_auc ?? null]);
  }
  const xs = [...byLabels.keys()].sort((a, b) => a - b);
  return [xs, xs.map((x) => byLabels.get(x)[0]), xs.map((x) => byLabels.get(x)[1])];
}

export function curveData(rounds) {
  const done = rounds.filter((r) => r.state === "succeeded").sort((a, b) => a.number - b.number);
  const strategy = armPoints(done, "strategy");
  const random = armPoints(done, "random");
  return { strategy, random, empty: strategy[0].length === 0 && random[0].length === 0 };
}

export function drawLearningCurve(node, rounds, previous) {
  const uPlot = window.uPlot;
  const { strategy, random, empty } = curveData(rounds);
  if (previous) previous.destroy();
  node.replaceChildren();
  if (empty) return null;
  const tables = [strategy];
  if (random[0].length) tables.push(random);
  const data = tables.length > 1 ? uPlot.join(tables) : strategy;
  const line = (label, colour, dash) => chartLine(label, colour, { dash, digits: 3 });
  const series = [
    { label: "Labels" },
    line("Strategy: balanced accuracy", COLOURS.strategy),
    line("Strategy: ROC AUC", COLOURS.strategy, [6, 4]),
  ];
  if (tables.length > 1) {
    series.push(line("Random: balanced accuracy", COLOURS.random), line("Random: ROC AUC", COLOURS.random, [6, 4]));
  }
  const width = Math.max(320, node.clientWidth || 480);
  return new uPlot(
    {
      width,
      height: 260,
      series,
      scales: { x: { time: false }, y: { range: [0, 1] } },
      axes: [{ label: "Labels used" }, { label: "Score", values: (u, ticks) => ticks.map((t) => t.toFixed(1)) }],
      legend: { live: true },
    },
    data,
    node,
  );
}
