// regl-scatterplot's UMD build (static/vendor/regl-scatterplot.min.js) reads pub-sub-es from the global
// createPubSub; pub-sub-es ships only as an ES module, so this module sets that global before it runs.
import createPubSub from "../vendor/pub-sub-es.js";

window.createPubSub = createPubSub;
