// One uPlot series drawn as a line with its points, shared by the learning curves (learning-curve.js,
// student-curve.js): gaps are spanned (a round or block without a figure), and the legend shows "–" for them.

export function chartLine(label, colour, { dash, digits = 2 } = {}) {
  return {
    label,
    stroke: colour,
    width: 2,
    dash,
    spanGaps: true,
    points: { show: true, size: 6 },
    value: (u, v) => (v === null || v === undefined ? "–" : v.toFixed(digits)),
  };
}
