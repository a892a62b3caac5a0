// A scale bar for OpenSeadragon from the slide's microns per pixel (the OSD plugin is not on npm).

const NICE = [1, 2, 5];
const TARGET_PX = 120;

// The largest 1/2/5 x 10^k not above ``limit``.
export function niceLength(limit) {
  if (!(limit > 0)) return 0;
  const power = 10 ** Math.floor(Math.log10(limit));
  let best = power;
  for (const step of NICE) if (step * power <= limit) best = step * power;
  return best;
}

export function formatLength(microns) {
  if (microns >= 1000) return `${+(microns / 1000).toPrecision(3)} mm`;
  if (microns < 1) return `${+(microns * 1000).toPrecision(3)} nm`;
  return `${+microns.toPrecision(3)} µm`;
}

export function attachScaleBar(viewer, node, mpp) {
  const bar = node.querySelector(".bar");
  const text = node.querySelector(".text");
  function update() {
    const item = viewer.world.getItemAt(0);
    if (!item) return;
    // Screen pixels per level-0 image pixel at the current (animated) zoom.
    const screenPerImage = item.viewportToImageZoom(viewer.viewport.getZoom(true));
    if (!(screenPerImage > 0)) return;
    const unitsPerScreenPx = (mpp || 1) / screenPerImage;
    const length = niceLength(TARGET_PX * unitsPerScreenPx);
    bar.style.width = `${Math.round(length / unitsPerScreenPx)}px`;
    text.textContent = mpp ? formatLength(length) : `${length} px (no scale in the slide's metadata)`;
    node.dataset.length = String(length);
  }
  viewer.addHandler("open", update);
  viewer.addHandler("animation", update);
  viewer.addHandler("resize", update);
  return update;
}
