// Patches drawn on a canvas over OpenSeadragon: grid, consensus labels and the prediction heatmap.
// One canvas redrawn per frame is far cheaper than thousands of DOM overlays.

// Diverging blue-yellow-red ramp for probabilities 0..1 (matches .ramp in app.css).
const RAMP = [
  [0, [49, 54, 149]],
  [0.5, [255, 255, 191]],
  [1, [165, 0, 38]],
];

export function rampColour(p, alpha = 0.55) {
  const t = Math.min(1, Math.max(0, Number(p) || 0));
  for (let i = 1; i < RAMP.length; i += 1) {
    const [t1, c1] = RAMP[i];
    const [t0, c0] = RAMP[i - 1];
    if (t <= t1) {
      const f = (t - t0) / (t1 - t0);
      const c = c0.map((v, k) => Math.round(v + (c1[k] - v) * f));
      return `rgba(${c[0]}, ${c[1]}, ${c[2]}, ${alpha})`;
    }
  }
  return `rgba(165, 0, 38, ${alpha})`;
}

function withAlpha(hex, alpha) {
  const n = Number.parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

export class PatchLayer {
  constructor(viewer, OSD) {
    this.viewer = viewer;
    this.OSD = OSD;
    this.patches = [];
    this.heatmap = [];
    this.show = { grid: false, labels: true, heatmap: false };
    this.selected = null;
    this.canvas = document.createElement("canvas");
    this.canvas.className = "overlay-canvas";
    this.canvas.setAttribute("aria-hidden", "true");
    viewer.canvas.appendChild(this.canvas);
    this.frame = 0;
    const schedule = () => this.schedule();
    for (const name of ["open", "animation", "update-viewport", "resize"]) viewer.addHandler(name, schedule);
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  // The level-0 patch under a viewer-element pixel, or null.
  patchAt(position) {
    const item = this.viewer.world.getItemAt(0);
    if (!item) return null;
    const point = item.viewportToImageCoordinates(this.viewer.viewport.pointFromPixel(position));
    return this.patches.find((p) => point.x >= p.x && point.x < p.x + p.size && point.y >= p.y && point.y < p.y + p.size) || null;
  }

  draw() {
    const item = this.viewer.world.getItemAt(0);
    const container = this.viewer.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = container.clientWidth;
    const height = container.clientHeight;
    if (this.canvas.width !== Math.round(width * ratio) || this.canvas.height !== Math.round(height * ratio)) {
      this.canvas.width = Math.round(width * ratio);
      this.canvas.height = Math.round(height * ratio);
      this.canvas.style.width = `${width}px`;
      this.canvas.style.height = `${height}px`;
    }
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    if (!item) return;
    const origin = item.imageToViewerElementCoordinates(new this.OSD.Point(0, 0));
    const far = item.imageToViewerElementCoordinates(new this.OSD.Point(10000, 0));
    const scale = (far.x - origin.x) / 10000;
    const visible = (p) => {
      const x = origin.x + p.x * scale;
      const y = origin.y + p.y * scale;
      const s = p.size * scale;
      return x + s >= 0 && y + s >= 0 && x <= width && y <= height ? [x, y, s] : null;
    };
    if (this.show.heatmap) {
      for (const p of this.heatmap) {
        const r = visible(p);
        if (!r) continue;
        ctx.fillStyle = rampColour(p.prob);
        ctx.fillRect(r[0], r[1], r[2], r[2]);
      }
    }
    if (this.show.labels) {
      ctx.lineWidth = 1.5;
      for (const p of this.patches) {
        if (!p.label || !p.colour) continue;
        const r = visible(p);
        if (!r) continue;
        ctx.fillStyle = withAlpha(p.colour, 0.4);
        ctx.fillRect(r[0], r[1], r[2], r[2]);
        ctx.strokeStyle = p.colour;
        ctx.strokeRect(r[0] + 0.75, r[1] + 0.75, r[2] - 1.5, r[2] - 1.5);
      }
    }
    if (this.show.grid && scale * 64 > 4) {
      ctx.lineWidth = 1;
      ctx.strokeStyle = "rgba(255, 255, 255, 0.6)";
      ctx.beginPath();
      for (const p of this.patches) {
        const r = visible(p);
        if (r) ctx.rect(r[0] + 0.5, r[1] + 0.5, r[2], r[2]);
      }
      ctx.stroke();
    }
    if (this.selected) {
      const r = visible(this.selected);
      if (r) {
        ctx.lineWidth = 3;
        ctx.strokeStyle = "#ffe14d";
        ctx.strokeRect(r[0], r[1], r[2], r[2]);
      }
    }
  }
}
