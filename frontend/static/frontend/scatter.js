// The embedding map's plot: points drawn with plain WebGL from the payload's typed arrays, wheel zoom, drag
// pan, Shift + drag lasso, hover and click picking. It replaces regl-scatterplot, whose set-up was most of the
// map's first paint without a GPU (Chromium's SwiftShader): its WebGL state (float framebuffers, a state
// texture, regl's commands compiled at run time), a k-d tree of the points and an array per point took
// 1.7 s from the payload's arrival to the first frame at 200,000 points on two busy cores (bench_map_browser). Here the positions go to the GPU as they
// arrived (the payload's float32 x/y, no copy), colours as one RGBA byte array, one draw call draws them all,
// and the lasso and picking read the same typed arrays: a lasso tests each point's box and polygon (a few
// milliseconds at 200,000), picking uses a grid of the points built on the first hover.
//
// Where WebGL itself runs on the CPU (SwiftShader: no GPU, or Chromium with --disable-gpu) the points are drawn
// by this page into a 2-D canvas's pixels instead: a software rasteriser's set-up per point made one frame of
// 200,000 points take 0.6 s of a busy machine there, the page's own loop over the typed arrays takes tens of
// milliseconds. ``?renderer=webgl`` or ``?renderer=cpu`` on the page's address chooses one (for tests).
//
// Events (subscribe(name, fn)): "select" ({points}) after a lasso or a click on a point, "deselect" after a
// lasso that caught nothing or a click on the background, "lassoEnd", "pointover" (index), "pointout".

const VERTEX = `
attribute vec2 xy;
attribute vec4 colour;
uniform vec2 centre;
uniform vec2 scale;
uniform float size;
varying vec4 v;
void main() {
  gl_Position = vec4((xy - centre) * scale, 0.0, 1.0);
  gl_PointSize = size;
  v = colour;
}`;
// Round points only where they are big enough to tell (a discard costs a software rasteriser dearly).
const FRAGMENT = `
precision mediump float;
uniform float round;
uniform vec4 tint;
varying vec4 v;
void main() {
  if (round > 0.5) {
    vec2 d = gl_PointCoord - vec2(0.5);
    if (dot(d, d) > 0.25) discard;
  }
  gl_FragColor = tint.a > 0.0 ? tint : v;
}`;
const LASSO_MIN_PX = 2; // the lasso keeps a pointer position this far from the last one kept
const CLICK_PX = 4; // a press and release closer than this is a click, not a drag
const PICK_PX = 4; // hover and click reach this far beyond a point's edge
const GRID = 256;

function compile(gl, type, source) {
  const shader = gl.createShader(type);
  gl.shaderSource(shader, source);
  gl.compileShader(shader);
  if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(`WebGL shader: ${gl.getShaderInfoLog(shader)}`);
  return shader;
}

function program(gl) {
  const p = gl.createProgram();
  gl.attachShader(p, compile(gl, gl.VERTEX_SHADER, VERTEX));
  gl.attachShader(p, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT));
  gl.linkProgram(p);
  if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error(`WebGL program: ${gl.getProgramInfoLog(p)}`);
  return p;
}

// Ray casting: is (x, y) inside the closed polygon (flat [x0, y0, x1, y1, ...])?
function inside(polygon, x, y) {
  let hit = false;
  for (let i = 0, j = polygon.length - 2; i < polygon.length; j = i, i += 2) {
    const xi = polygon[i], yi = polygon[i + 1], xj = polygon[j], yj = polygon[j + 1];
    if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) hit = !hit;
  }
  return hit;
}

// Does this browser's WebGL run on the CPU? Asked of a throwaway context, let go at once.
function softwareWebgl() {
  const gl = document.createElement("canvas").getContext("webgl");
  if (!gl) return true;
  const info = gl.getExtension("WEBGL_debug_renderer_info");
  const name = info ? String(gl.getParameter(info.UNMASKED_RENDERER_WEBGL)) : "";
  gl.getExtension("WEBGL_lose_context")?.loseContext();
  return /swiftshader|llvmpipe|software/i.test(name);
}

// Painters: one frame of the points (and the selection on top) from the camera, in device pixels.
function webglPainter(target) {
  const gl = target.getContext("webgl", { alpha: false, antialias: false, depth: false, stencil: false, premultipliedAlpha: false, preserveDrawingBuffer: false });
  if (!gl) throw new Error("This browser cannot draw the map: WebGL is off or missing.");
  const prog = program(gl);
  const at = { xy: gl.getAttribLocation(prog, "xy"), colour: gl.getAttribLocation(prog, "colour") };
  const u = Object.fromEntries(["centre", "scale", "size", "round", "tint"].map((n) => [n, gl.getUniformLocation(prog, n)]));
  const buffers = { xy: gl.createBuffer(), colour: gl.createBuffer(), selXy: gl.createBuffer(), selColour: gl.createBuffer() };
  gl.useProgram(prog);
  gl.enable(gl.BLEND);
  gl.blendFunc(gl.SRC_ALPHA, gl.ONE_MINUS_SRC_ALPHA);
  gl.clearColor(1, 1, 1, 1);
  const upload = (buffer, data, usage) => {
    gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
    gl.bufferData(gl.ARRAY_BUFFER, data, usage);
  };
  function pass(buffer, colourBuffer, count, size, tint) {
    gl.bindBuffer(gl.ARRAY_BUFFER, buffer);
    gl.enableVertexAttribArray(at.xy);
    gl.vertexAttribPointer(at.xy, 2, gl.FLOAT, false, 0, 0);
    gl.bindBuffer(gl.ARRAY_BUFFER, colourBuffer);
    gl.enableVertexAttribArray(at.colour);
    gl.vertexAttribPointer(at.colour, 4, gl.UNSIGNED_BYTE, true, 0, 0);
    gl.uniform1f(u.size, size);
    gl.uniform1f(u.round, size >= 4 ? 1 : 0);
    gl.uniform4fv(u.tint, tint || [0, 0, 0, 0]);
    gl.drawArrays(gl.POINTS, 0, count);
  }
  return {
    kind: "webgl",
    points: (xy) => upload(buffers.xy, xy, gl.STATIC_DRAW),
    colours: (rgba) => upload(buffers.colour, rgba, gl.STATIC_DRAW),
    selection(sx, sc) {
      upload(buffers.selXy, sx, gl.DYNAMIC_DRAW);
      upload(buffers.selColour, sc, gl.DYNAMIC_DRAW);
    },
    render(f) {
      gl.viewport(0, 0, target.width, target.height);
      gl.clear(gl.COLOR_BUFFER_BIT);
      gl.uniform2f(u.centre, f.cx, f.cy);
      gl.uniform2f(u.scale, (2 * f.k) / target.width, (2 * f.k) / target.height);
      if (f.n) pass(buffers.xy, buffers.colour, f.n, f.size);
      if (f.selected) {
        pass(buffers.selXy, buffers.selColour, f.selected, f.size + 3 * f.ratio, [0, 0, 0, 1]);
        pass(buffers.selXy, buffers.selColour, f.selected, Math.max(1, f.size - f.ratio));
      }
    },
  };
}

// The rows a point of ``size`` device pixels covers, as [start, end) pixel offsets per row: a square, or a disc
// from 4 px on (as the shader draws them).
function footprint(size) {
  const d = Math.max(1, Math.round(size));
  const spans = new Int32Array(2 * d);
  for (let dy = 0; dy < d; dy += 1) {
    const ry = dy + 0.5 - d / 2;
    const half = d < 4 ? d / 2 : Math.sqrt(Math.max(0, (d * d) / 4 - ry * ry));
    spans[2 * dy] = Math.round(d / 2 - half);
    spans[2 * dy + 1] = Math.round(d / 2 + half);
  }
  return { d, spans };
}

// Plain loops over typed arrays: written so that V8 optimises them on their first call (an earlier version
// with a generic per-pixel offset list ran unoptimised for a whole first frame, 0.9 s at 200,000 points).
function cpuPainter(target) {
  const ctx = target.getContext("2d", { alpha: false });
  let xy = new Float32Array(0), rgba = new Uint32Array(0), sx = new Float32Array(0), sc = new Uint32Array(0);
  let image = null, pixels = new Uint32Array(0);
  const words = (bytes) => new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  // Each point in its colour (little-endian RGBA words) blended over what is there, or all in ``tint`` (> 0).
  function splat(f, positions, colours, count, size, tint) {
    const px = pixels, W = target.width, H = target.height;
    const { d, spans } = footprint(size);
    const k = f.k, ox = W / 2 - f.cx * k - d / 2 + 0.5, oy = H / 2 + f.cy * k - d / 2 + 0.5;
    for (let i = 0; i < count; i += 1) {
      const x0 = Math.floor(ox + positions[2 * i] * k), y0 = Math.floor(oy - positions[2 * i + 1] * k);
      if (x0 >= W || y0 >= H || x0 + d <= 0 || y0 + d <= 0) continue;
      const c = tint ? tint : colours[i];
      const a = c >>> 24, ia = 255 - a;
      const r = (c & 255) * a, g = ((c >>> 8) & 255) * a, b = ((c >>> 16) & 255) * a;
      for (let dy = 0; dy < d; dy += 1) {
        const y = y0 + dy;
        if (y < 0 || y >= H) continue;
        const xa = Math.max(0, x0 + spans[2 * dy]), xb = Math.min(W, x0 + spans[2 * dy + 1]);
        let p = y * W + xa;
        if (a === 255) {
          for (let x = xa; x < xb; x += 1, p += 1) px[p] = c;
        } else {
          for (let x = xa; x < xb; x += 1, p += 1) {
            const o = px[p];
            px[p] = 0xff000000 | ((((b + ((o >>> 16) & 255) * ia) >> 8) & 255) << 16) | ((((g + ((o >>> 8) & 255) * ia) >> 8) & 255) << 8) | (((r + (o & 255) * ia) >> 8) & 255);
          }
        }
      }
    }
  }
  return {
    kind: "cpu",
    points: (positions) => {
      xy = positions;
    },
    colours: (bytes) => {
      rgba = words(bytes);
    },
    selection(positions, bytes) {
      sx = positions;
      sc = words(bytes);
    },
    render(f) {
      if (!image || image.width !== target.width || image.height !== target.height) {
        image = ctx.createImageData(target.width, target.height);
        pixels = new Uint32Array(image.data.buffer);
      }
      pixels.fill(0xffffffff);
      splat(f, xy, rgba, f.n, f.size, 0);
      if (f.selected) {
        splat(f, sx, sc, f.selected, f.size + 3 * f.ratio, 0xff000000);
        splat(f, sx, sc, f.selected, Math.max(1, f.size - f.ratio), 0);
      }
      ctx.putImageData(image, 0, 0);
    },
  };
}

export function createScatter({ canvas, glCanvas, lassoColour = "#7a2e6b", renderer = "auto" }) {
  const cpu = renderer === "cpu" || (renderer !== "webgl" && softwareWebgl());
  const painter = cpu ? cpuPainter(glCanvas) : webglPainter(glCanvas);
  const overlay = canvas.getContext("2d");

  const listeners = new Map();
  const publish = (name, payload) => (listeners.get(name) || []).forEach((fn) => fn(payload));
  let xy = new Float32Array(0);
  let colours = new Uint8Array(0);
  let n = 0;
  let pointSize = 4;
  let selected = [];
  let grid = null; // built on the first pick
  let hovered = -1;
  let width = 1, height = 1, ratio = 1; // CSS pixels of the canvas, device pixels per CSS pixel
  const view = { cx: 0, cy: 0, s: 1 }; // the data point at the canvas's centre, CSS pixels per data unit
  let fitted = false;
  let frame = 0;
  let painted = [];

  // --- the camera ---
  const toScreen = (x, y) => [width / 2 + (x - view.cx) * view.s, height / 2 - (y - view.cy) * view.s];
  const toData = (sx, sy) => [view.cx + (sx - width / 2) / view.s, view.cy - (sy - height / 2) / view.s];
  function fit() {
    view.cx = 0;
    view.cy = 0;
    view.s = (Math.min(width, height) / 2) * 0.95; // the layout lies in [-1, 1] on both axes
    fitted = true;
  }

  function resize() {
    const box = canvas.getBoundingClientRect();
    width = Math.max(1, box.width);
    height = Math.max(1, box.height);
    ratio = window.devicePixelRatio || 1;
    for (const c of [canvas, glCanvas]) {
      c.width = Math.round(width * ratio);
      c.height = Math.round(height * ratio);
    }
    overlay.setTransform(ratio, 0, 0, ratio, 0, 0);
    if (!fitted) fit();
    redraw();
  }

  // --- drawing ---
  function render() {
    frame = 0;
    painter.render({ cx: view.cx, cy: view.cy, k: view.s * ratio, ratio, size: pointSize * ratio, n, selected: selected.length });
    const done = painted;
    painted = [];
    done.forEach((resolve) => resolve());
  }

  function redraw() {
    if (!frame) frame = requestAnimationFrame(render);
    return new Promise((resolve) => painted.push(resolve));
  }

  function uploadSelection() {
    const sx = new Float32Array(selected.length * 2);
    const sc = new Uint8Array(selected.length * 4);
    for (let k = 0; k < selected.length; k += 1) {
      const i = selected[k];
      sx[2 * k] = xy[2 * i];
      sx[2 * k + 1] = xy[2 * i + 1];
      sc.set(colours.subarray(4 * i, 4 * i + 4), 4 * k);
    }
    painter.selection(sx, sc);
  }

  // --- picking: a grid of the points in data space, cell by cell ---
  function buildGrid() {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i += 1) {
      const x = xy[2 * i], y = xy[2 * i + 1];
      if (x < x0) x0 = x;
      if (x > x1) x1 = x;
      if (y < y0) y0 = y;
      if (y > y1) y1 = y;
    }
    const w = Math.max(1e-9, x1 - x0) / GRID, h = Math.max(1e-9, y1 - y0) / GRID;
    const cell = new Uint32Array(n);
    const start = new Uint32Array(GRID * GRID + 1);
    for (let i = 0; i < n; i += 1) {
      const cx = Math.min(GRID - 1, Math.floor((xy[2 * i] - x0) / w));
      const cy = Math.min(GRID - 1, Math.floor((xy[2 * i + 1] - y0) / h));
      cell[i] = cy * GRID + cx;
      start[cell[i] + 1] += 1;
    }
    for (let c = 0; c < GRID * GRID; c += 1) start[c + 1] += start[c];
    const fill = start.slice(0, GRID * GRID);
    const order = new Uint32Array(n);
    for (let i = 0; i < n; i += 1) order[fill[cell[i]]++] = i;
    return { x0, y0, w, h, start, order };
  }

  function pick(sx, sy) {
    if (!n) return -1;
    grid = grid || buildGrid();
    const [x, y] = toData(sx, sy);
    const reach = (pointSize / 2 + PICK_PX) / view.s;
    const clamp = (v) => Math.max(0, Math.min(GRID - 1, v));
    const cx0 = clamp(Math.floor((x - reach - grid.x0) / grid.w)), cx1 = clamp(Math.floor((x + reach - grid.x0) / grid.w));
    const cy0 = clamp(Math.floor((y - reach - grid.y0) / grid.h)), cy1 = clamp(Math.floor((y + reach - grid.y0) / grid.h));
    let best = -1, bestD = reach * reach;
    for (let cy = cy0; cy <= cy1; cy += 1) {
      for (let cx = cx0; cx <= cx1; cx += 1) {
        const c = cy * GRID + cx;
        for (let k = grid.start[c]; k < grid.start[c + 1]; k += 1) {
          const i = grid.order[k];
          const dx = xy[2 * i] - x, dy = xy[2 * i + 1] - y;
          const d = dx * dx + dy * dy;
          if (d <= bestD) {
            bestD = d;
            best = i;
          }
        }
      }
    }
    return best;
  }

  // --- the lasso ---
  function caught(polygonScreen) {
    const polygon = new Float64Array(polygonScreen.length);
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (let k = 0; k < polygonScreen.length; k += 2) {
      const [x, y] = toData(polygonScreen[k], polygonScreen[k + 1]);
      polygon[k] = x;
      polygon[k + 1] = y;
      x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); // prettier-ignore
    }
    const out = [];
    for (let i = 0; i < n; i += 1) {
      const x = xy[2 * i], y = xy[2 * i + 1];
      if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && inside(polygon, x, y)) out.push(i);
    }
    return out;
  }

  function drawLasso(points) {
    overlay.clearRect(0, 0, width, height);
    if (points.length < 4) return;
    overlay.beginPath();
    overlay.moveTo(points[0], points[1]);
    for (let k = 2; k < points.length; k += 2) overlay.lineTo(points[k], points[k + 1]);
    overlay.closePath();
    overlay.strokeStyle = lassoColour;
    overlay.lineWidth = 2;
    overlay.stroke();
    overlay.fillStyle = `${lassoColour}22`;
    overlay.fill();
  }

  // --- the pointer ---
  let gesture = null; // {kind: "lasso" | "pan", x, y, points, moved}
  const local = (event) => {
    const box = canvas.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  };
  function hover(i) {
    if (i === hovered) return;
    if (hovered >= 0) publish("pointout", hovered);
    hovered = i;
    if (i >= 0) publish("pointover", i);
  }
  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    const [x, y] = local(event);
    gesture = { kind: event.shiftKey ? "lasso" : "pan", x, y, points: [x, y], moved: false, view: { ...view } };
    canvas.setPointerCapture?.(event.pointerId);
    hover(-1);
  });
  canvas.addEventListener("pointermove", (event) => {
    const [x, y] = local(event);
    if (!gesture) {
      hover(pick(x, y));
      return;
    }
    if (Math.hypot(x - gesture.x, y - gesture.y) >= CLICK_PX) gesture.moved = true;
    if (gesture.kind === "pan") {
      view.cx = gesture.view.cx - (x - gesture.x) / view.s;
      view.cy = gesture.view.cy + (y - gesture.y) / view.s;
      redraw();
      return;
    }
    const p = gesture.points;
    if (Math.hypot(x - p[p.length - 2], y - p[p.length - 1]) >= LASSO_MIN_PX) {
      p.push(x, y);
      drawLasso(p);
    }
  });
  const release = (event) => {
    if (!gesture) return;
    const g = gesture;
    gesture = null;
    const [x, y] = local(event);
    if (g.kind === "lasso" && g.moved && g.points.length >= 6) {
      overlay.clearRect(0, 0, width, height);
      const points = caught(g.points);
      if (points.length) select(points);
      else deselect();
      publish("lassoEnd", { points });
      return;
    }
    overlay.clearRect(0, 0, width, height);
    if (g.moved || event.type === "pointercancel") return;
    const i = pick(x, y);
    if (i >= 0) select([i]);
    else deselect();
  };
  canvas.addEventListener("pointerup", release);
  canvas.addEventListener("pointercancel", release);
  canvas.addEventListener("pointerleave", () => {
    if (!gesture) hover(-1);
  });
  canvas.addEventListener(
    "wheel",
    (event) => {
      event.preventDefault();
      const [x, y] = local(event);
      const [dx, dy] = toData(x, y);
      const factor = Math.exp(-event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.002));
      view.s = Math.min(1e6, Math.max(1e-3, view.s * factor));
      // Keep the data point under the pointer where it is.
      view.cx = dx - (x - width / 2) / view.s;
      view.cy = dy + (y - height / 2) / view.s;
      redraw();
    },
    { passive: false },
  );
  new ResizeObserver(resize).observe(canvas);
  resize();

  // --- the public side ---
  function select(indices, { preventEvent = false } = {}) {
    selected = Array.from(indices).filter((i) => i >= 0 && i < n);
    uploadSelection();
    redraw();
    if (!preventEvent) publish(selected.length ? "select" : "deselect", { points: selected.slice() });
  }
  function deselect({ preventEvent = false } = {}) {
    selected = [];
    redraw();
    if (!preventEvent) publish("deselect");
  }

  return {
    // New points (positions float32 x0 y0 x1 y1 ..., colours RGBA bytes per point); the same positions
    // array again keeps the buffers and the picking grid and sends only the colours.
    draw({ xy: positions, colours: rgba, size = 4 }) {
      if (positions !== xy) {
        xy = positions;
        n = positions.length / 2;
        grid = null;
        painter.points(xy);
      }
      colours = rgba;
      pointSize = size;
      painter.colours(colours);
      selected = selected.filter((i) => i < n);
      uploadSelection();
      return redraw();
    },
    select,
    deselect,
    getScreenPosition(i) {
      return i >= 0 && i < n ? toScreen(xy[2 * i], xy[2 * i + 1]) : undefined;
    },
    subscribe(name, fn) {
      listeners.set(name, [...(listeners.get(name) || []), fn]);
    },
    get count() {
      return n;
    },
    renderer: painter.kind,
  };
}
