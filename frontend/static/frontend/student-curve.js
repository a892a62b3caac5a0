// A student's learning curve (annotations.students): gold accuracy and Cohen's κ against the experts, one point
// per block of their answers (uPlot). Used by the dashboard (any student, experts and admins) and by the
// annotator in training mode ("My progress": the student's own curve only).
import { el } from "./api.js";
import { chartLine } from "./chart-line.js";

const COLOURS = { gold: "#1b7f3b", kappa: "#7b2d6b" };

// [answers so far, gold accuracy, κ] per block; null where a block has no gold answer or no expert pair.
export function studentCurveData(body) {
  const blocks = (body && body.blocks) || [];
  return [
    blocks.map((b) => b.last_answer),
    blocks.map((b) => (b.gold_accuracy === undefined ? null : b.gold_accuracy)),
    blocks.map((b) => (b.kappa_vs_experts === undefined ? null : b.kappa_vs_experts)),
  ];
}

export function drawStudentCurve(node, body, previous) {
  if (previous) previous.destroy();
  node.replaceChildren();
  const data = studentCurveData(body);
  node.dataset.blocks = String(data[0].length);
  if (!data[0].length) {
    node.append(el("p", { class: "note", text: "No answers yet." }));
    return null;
  }
  const uPlot = window.uPlot;
  const low = Math.min(0, ...data[2].filter((v) => v !== null));
  return new uPlot(
    {
      width: Math.max(220, node.clientWidth || 420),
      height: 220,
      series: [
        { label: "Answers" },
        chartLine("Gold accuracy", COLOURS.gold),
        chartLine("κ vs experts", COLOURS.kappa, { dash: [6, 4] }),
      ],
      scales: { x: { time: false }, y: { range: [low, 1] } },
      axes: [{ label: `Answers (blocks of ${body.block_size})` }, { label: "Score", values: (u, ticks) => ticks.map((t) => t.toFixed(1)) }],
      legend: { live: true },
    },
    data,
    node,
  );
}
