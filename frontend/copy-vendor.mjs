// Copies the browser builds of our npm dependencies into static/vendor (served by Django).
import { cpSync, mkdirSync, rmSync } from "node:fs";

const out = new URL("./static/vendor/", import.meta.url);
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const files = [
  ["openseadragon/build/openseadragon/openseadragon.min.js", "openseadragon.min.js"],
  // The minified build ends with a sourceMappingURL; collectstatic (manifest storage) needs the map.
  ["openseadragon/build/openseadragon/openseadragon.min.js.map", "openseadragon.min.js.map"],
  ["openseadragon/build/openseadragon/images", "openseadragon-images"],
  ["uplot/dist/uPlot.iife.min.js", "uPlot.iife.min.js"],
  ["uplot/dist/uPlot.min.css", "uPlot.min.css"],
];
for (const [from, to] of files) {
  cpSync(new URL(`./node_modules/${from}`, import.meta.url), new URL(to, out), { recursive: true });
}
console.log(`copied ${files.length} vendor assets to static/vendor`);
