// The Deconv tab: every tracked feature of a DeconvCallback run across its firings.
// Plain ES module, no bundler. TensorBoard loads it in an iframe whose base URL is /data/plugin/deconv/,
// so the routes are fetched by relative URL. State (run, layer, feature, epoch) is kept in location.hash.

const POLL_MS = 5000; // live: how often the runs listing is fetched again
const CELL = 56; // matrix cell size in CSS pixels
const LARGE = 112; // a selected feature's pictures

const STYLE = `
  body { font: 13px/1.4 Roboto, sans-serif; margin: 12px; color: #212121; background: #fff; }
  #bar { display: flex; gap: 16px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
  #bar label { display: flex; gap: 6px; align-items: center; }
  #status { color: #757575; }
  #charts { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 8px; }
  .chart { border: 1px solid #e0e0e0; border-radius: 4px; padding: 4px 6px; }
  .chart h4 { margin: 0; font-size: 12px; font-weight: 500; }
  #main { display: flex; gap: 16px; align-items: flex-start; }
  #matrix { overflow: auto; max-height: calc(100vh - 200px); flex: 0 0 auto; }
  .grid { display: grid; gap: 3px; align-items: center; }
  .head { font-weight: 500; text-align: center; position: sticky; top: 0; background: #fff; z-index: 1; }
  .label { text-align: right; padding-right: 4px; color: #616161; }
  .cell { display: flex; gap: 1px; cursor: pointer; outline: 2px solid transparent; }
  .cell:hover, .cell.selected { outline-color: #f57c00; }
  .sprite { image-rendering: pixelated; background-repeat: no-repeat; }
  .mark { display: flex; align-items: center; justify-content: center; width: ${CELL}px; height: ${CELL}px;
          background: #f5d7d7; color: #781414; font-size: 11px; }
  #panel { flex: 1 1 auto; min-width: 360px; border-left: 1px solid #e0e0e0; padding-left: 16px; }
  #panel h3 { margin: 0 0 8px; }
  .epochs { display: flex; gap: 10px; flex-wrap: wrap; }
  figure { margin: 0; text-align: center; }
  figure img { image-rendering: pixelated; display: block; }
  .pair { display: flex; gap: 2px; cursor: pointer; outline: 2px solid transparent; }
  .pair.selected { outline-color: #f57c00; }
  .row { display: flex; gap: 24px; flex-wrap: wrap; margin-top: 12px; }
  .topk { display: grid; grid-template-columns: repeat(3, auto); gap: 2px; }
  table { border-collapse: collapse; margin-top: 8px; }
  td, th { padding: 1px 8px; text-align: right; border-bottom: 1px solid #eee; }
  #preview { position: fixed; pointer-events: none; display: none; background: #fff; padding: 4px;
             border: 1px solid #bdbdbd; box-shadow: 0 2px 6px rgba(0,0,0,.2); z-index: 2; }
  .note { color: #757575; }
`;

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};

const query = (route, params) => `${route}?${new URLSearchParams(params)}`;

async function getJSON(route, params = {}) {
  const response = await fetch(query(route, params));
  if (!response.ok) throw new Error(`${route}: ${response.status} ${await response.text()}`);
  return response.json();
}

const format = (x) => (x === null || x === undefined ? "–" : Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3));

// A sprite cell: row `row` of a vertical strip of `rows` pictures of size h x w, scaled into CELL.
function sprite(url, row, rows, [h, w], size = CELL) {
  const scale = size / Math.max(h, w);
  return el("div", {
    class: "sprite",
    style: {
      width: `${w * scale}px`,
      height: `${h * scale}px`,
      backgroundImage: `url("${url}")`,
      backgroundSize: `${w * scale}px ${rows * h * scale}px`,
      backgroundPosition: `0 ${-row * h * scale}px`,
    },
  });
}

function picture(url, [h, w], size, title) {
  const scale = size / Math.max(h, w);
  return el("img", { src: url, width: Math.round(w * scale), height: Math.round(h * scale), title, alt: title });
}

// A small line chart of [[epoch, value], ...] (null values leave gaps).
function lineChart(title, points, width = 220, height = 90) {
  const box = el("div", { class: "chart", "data-chart": title }, el("h4", {}, title));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const known = points.filter(([, y]) => y !== null);
  if (!known.length) {
    box.append(el("div", { class: "note", style: { width: `${width}px` } }, "no values yet"));
    return box;
  }
  const xs = points.map(([x]) => x);
  const ys = known.map(([, y]) => y);
  let [lo, hi] = [Math.min(0, ...ys), Math.max(...ys)];
  if (hi - lo < 1e-12) hi = lo + 1;
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const pad = { left: 34, right: 6, top: 6, bottom: 16 };
  const px = (x) => pad.left + ((x - x0) / Math.max(x1 - x0, 1)) * (width - pad.left - pad.right);
  const py = (y) => height - pad.bottom - ((y - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  add("line", { x1: pad.left, x2: width - pad.right, y1: py(lo), y2: py(lo), stroke: "#bdbdbd" });
  add("text", { x: 2, y: py(hi) + 4, "font-size": 9 }, format(hi));
  add("text", { x: 2, y: py(lo), "font-size": 9 }, format(lo));
  add("text", { x: pad.left, y: height - 3, "font-size": 9 }, `epoch ${x0}`);
  add("text", { x: width - pad.right, y: height - 3, "font-size": 9, "text-anchor": "end" }, `${x1}`);
  let path = "";
  let pen = "M";
  for (const [x, y] of points) {
    if (y === null) {
      pen = "M";
      continue;
    }
    path += `${pen}${px(x).toFixed(1)},${py(y).toFixed(1)} `;
    pen = "L";
  }
  add("path", { d: path, fill: "none", stroke: "#f57c00", "stroke-width": 1.5 });
  for (const [x, y] of known) add("circle", { cx: px(x), cy: py(y), r: 2.5, fill: "#f57c00" });
  box.append(svg);
  return box;
}

class Dashboard {
  constructor(root) {
    this.root = root;
    this.runs = [];
    const state = new URLSearchParams(location.hash.slice(1));
    this.state = {
      run: state.get("run"),
      layer: state.get("layer"),
      feature: state.has("feature") ? Number(state.get("feature")) : null,
      epoch: state.has("epoch") ? Number(state.get("epoch")) : null,
      patches: state.get("patches") === "1",
    };
    this.runSelect = el("select", { id: "run", onchange: () => this.pick({ run: this.runSelect.value, layer: null }) });
    this.layerSelect = el("select", { id: "layer", onchange: () => this.pick({ layer: this.layerSelect.value }) });
    this.patchBox = el("input", { type: "checkbox", id: "patches", onchange: () => this.pick({ patches: this.patchBox.checked }) });
    this.status = el("span", { id: "status" });
    this.charts = el("div", { id: "charts" });
    this.matrix = el("div", { id: "matrix" });
    this.panel = el("div", { id: "panel" });
    this.preview = el("div", { id: "preview" });
    root.append(
      el("div", { id: "bar" },
        el("label", {}, "Run", this.runSelect),
        el("label", {}, "Layer", this.layerSelect),
        el("label", {}, this.patchBox, "probe patches beside crops"),
        this.status),
      this.charts,
      el("div", { id: "main" }, this.matrix, this.panel),
      this.preview,
    );
  }

  async start() {
    await this.poll();
    setInterval(() => this.poll().catch((e) => this.say(`${e.message}`)), POLL_MS);
  }

  say(text) {
    this.status.textContent = text;
  }

  get run() {
    return this.runs.find((r) => r.run === this.state.run);
  }

  // Live: fetch the listing; redraw what changed (new firings, new top-k files, skipped files).
  async poll() {
    const { runs } = await getJSON("runs");
    const before = JSON.stringify(this.run || null);
    this.runs = runs;
    if (!runs.length) {
      this.say("No DeconvCallback runs in this logdir yet.");
      return;
    }
    if (!this.run) this.state.run = runs[0].run;
    const run = this.run;
    if (!(this.state.layer in run.layers)) this.state.layer = Object.keys(run.layers)[0];
    this.fillSelects();
    const skipped = run.skipped.length ? ` · ${run.skipped.length} unreadable file(s) skipped: ${run.skipped.join(", ")}` : "";
    this.say(`${run.epochs.length} firings · updated ${new Date().toLocaleTimeString()}${skipped}`);
    if (JSON.stringify(run) !== before) await this.draw();
  }

  fillSelects() {
    const options = (select, values, chosen) => {
      const same = select.options.length === values.length && values.every((v, i) => select.options[i].value === v);
      if (!same) select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
      select.value = chosen;
    };
    options(this.runSelect, this.runs.map((r) => r.run), this.state.run);
    options(this.layerSelect, Object.keys(this.run.layers), this.state.layer);
    this.patchBox.checked = this.state.patches;
  }

  async pick(change) {
    Object.assign(this.state, change);
    if ("run" in change || "layer" in change) {
      this.state.feature = null;
      this.state.epoch = null;
    }
    if (!(this.state.layer in (this.run?.layers || {}))) this.state.layer = Object.keys(this.run.layers)[0];
    this.fillSelects();
    await this.draw();
  }

  saveState() {
    const s = { run: this.state.run, layer: this.state.layer };
    if (this.state.feature !== null) s.feature = this.state.feature;
    if (this.state.epoch !== null) s.epoch = this.state.epoch;
    if (this.state.patches) s.patches = "1";
    history.replaceState(null, "", `#${new URLSearchParams(s)}`);
  }

  async draw() {
    const { run, layer } = this.state;
    const matrix = await getJSON("matrix", { run, layer });
    if (run !== this.state.run || layer !== this.state.layer) return; // the user moved on meanwhile
    this.data = matrix;
    if (this.state.feature === null || !matrix.features.includes(this.state.feature)) this.state.feature = matrix.features[0];
    this.drawCharts(matrix.charts);
    this.drawMatrix(matrix);
    await this.drawPanel();
  }

  drawCharts(charts) {
    this.charts.replaceChildren(
      lineChart("CKA to previous firing", charts.cka_previous),
      lineChart("CKA to last firing", charts.cka_last),
      lineChart("dead share", charts.dead),
      lineChart("drift (1 − cos)", charts.drift),
      lineChart("aliasing (first conv's stride lattice)", charts.aliasing),
      lineChart("first-layer filters: low band", charts.spectrum_low),
      lineChart("first-layer filters: mid band", charts.spectrum_mid),
      lineChart("first-layer filters: high band", charts.spectrum_high),
    );
  }

  strip(column, kind) {
    return query("strip", { run: this.state.run, layer: this.state.layer, epoch: column.epoch, kind, v: column.version });
  }

  drawMatrix(matrix) {
    const kinds = this.state.patches ? ["crops", "patches"] : ["crops"];
    const grid = el("div", {
      class: "grid",
      "data-layer": matrix.layer,
      style: { gridTemplateColumns: `auto repeat(${matrix.columns.length}, auto)` },
    });
    grid.append(el("div", { class: "head" }, "feature"));
    for (const column of matrix.columns) grid.append(el("div", { class: "head" }, `epoch ${column.epoch}`));
    for (const feature of matrix.features) {
      grid.append(el("div", { class: "label" }, `#${feature}`));
      for (const column of matrix.columns) {
        const row = column.features.indexOf(feature);
        if (row < 0) {
          grid.append(el("div"));
          continue;
        }
        const mark = column.mark[row];
        const cell = el("div", {
          class: "cell",
          "data-epoch": column.epoch,
          "data-feature": feature,
          title: `feature ${feature} after epoch ${column.epoch}: value ${format(column.value[row])}, probe image ${column.source[row]}`,
          onclick: () => this.select(feature, column.epoch),
          onmousemove: (event) => this.showPreview(event, column, row),
          onmouseleave: () => (this.preview.style.display = "none"),
        });
        if (mark) cell.append(el("div", { class: `mark ${mark.toLowerCase()}` }, mark));
        else for (const kind of kinds) cell.append(sprite(this.strip(column, kind), row, column.features.length, column.size));
        grid.append(cell);
      }
    }
    this.matrix.replaceChildren(grid);
    this.highlight();
  }

  showPreview(event, column, row) {
    const size = 3 * CELL;
    this.preview.replaceChildren(
      el("div", { style: { display: "flex", gap: "4px" } },
        sprite(this.strip(column, "crops"), row, column.features.length, column.size, size),
        sprite(this.strip(column, "patches"), row, column.features.length, column.size, size)),
      el("div", {}, `epoch ${column.epoch} · value ${format(column.value[row])} · probe image ${column.source[row]}`),
    );
    Object.assign(this.preview.style, { display: "block", left: `${event.clientX + 16}px`, top: `${event.clientY + 16}px` });
  }

  highlight() {
    for (const cell of this.matrix.querySelectorAll(".cell")) {
      const on = Number(cell.dataset.feature) === this.state.feature && Number(cell.dataset.epoch) === this.state.epoch;
      cell.classList.toggle("selected", on);
    }
  }

  async select(feature, epoch) {
    Object.assign(this.state, { feature, epoch });
    this.highlight();
    await this.drawPanel();
  }

  image(params) {
    return query("image", { run: this.state.run, layer: this.state.layer, feature: this.state.feature, ...params });
  }

  async drawPanel() {
    const { run, layer, feature } = this.state;
    this.saveState();
    if (feature === null || feature === undefined) {
      this.panel.replaceChildren(el("p", { class: "note" }, "Click a feature to see its story."));
      return;
    }
    const story = await getJSON("feature", { run, layer, feature });
    if (run !== this.state.run || layer !== this.state.layer || feature !== this.state.feature) return;
    const epochs = story.history.map((h) => h.epoch);
    if (!epochs.includes(this.state.epoch)) this.state.epoch = epochs[epochs.length - 1];
    const chosen = story.history.find((h) => h.epoch === this.state.epoch);
    this.saveState();
    this.highlight();

    const every = el("div", { class: "epochs" });
    for (const h of story.history) {
      const pair = el("div", { class: `pair${h.epoch === chosen.epoch ? " selected" : ""}`, onclick: () => this.select(feature, h.epoch) });
      if (h.mark) pair.append(el("div", { class: `mark ${h.mark.toLowerCase()}`, style: { width: `${LARGE}px`, height: `${LARGE}px` } }, h.mark));
      else
        pair.append(
          picture(this.image({ epoch: h.epoch, kind: "crop", v: h.version }), h.size, LARGE, `projection after epoch ${h.epoch}`),
          picture(this.image({ epoch: h.epoch, kind: "patch", v: h.version }), h.size, LARGE, `probe patch after epoch ${h.epoch}`),
        );
      every.append(el("figure", { "data-epoch": h.epoch }, pair, el("figcaption", {}, `epoch ${h.epoch}`)));
    }

    const source = chosen.has_source_image
      ? el("figure", { class: "source" },
          picture(this.image({ epoch: chosen.epoch, kind: "source", v: chosen.version }), [1, 1], 2 * LARGE, `probe image ${chosen.source}`),
          el("figcaption", {}, `strongest probe image #${chosen.source} after epoch ${chosen.epoch}, receptive field boxed`))
      : el("p", { class: "note" }, "This firing file holds no probe images (run files of version 2 and later do).");

    let top = el("p", { class: "note" }, "No top-k file for this feature (DeconvCallback(top_k=9) writes one).");
    if (story.top_k) {
      const t = story.top_k;
      const block = (kind) =>
        el("div", { class: "topk" },
          ...Array.from({ length: t.k }, (_, rank) =>
            el("img", { src: this.image({ epoch: t.epoch, kind, rank, v: t.version }), width: 48, height: 48, title: `#${rank + 1}: value ${format(t.value[rank])}, image ${t.source[rank]}`, alt: `top ${rank + 1}`, style: { imageRendering: "pixelated" } })));
      top = el("figure", { class: "topk-figure" },
        el("div", { style: { display: "flex", gap: "8px" } }, block("top_crop"), block("top_patch")),
        el("figcaption", {}, `top ${t.k} over the validation set after epoch ${t.epoch}`));
    }

    const table = el("table", {},
      el("tr", {}, el("th", {}, "epoch"), el("th", {}, "value"), el("th", {}, "probe image"), el("th", {}, "mark")),
      ...story.history.map((h) => el("tr", {}, el("td", {}, h.epoch), el("td", {}, format(h.value)), el("td", {}, h.source), el("td", {}, h.mark || ""))));

    this.panel.setAttribute("data-feature", feature);
    this.panel.setAttribute("data-epoch", chosen.epoch);
    this.panel.replaceChildren(
      el("h3", {}, `${layer} · feature ${feature}`),
      every,
      el("div", { class: "row" }, source, top),
      el("div", { class: "row" },
        lineChart("value over epochs", story.history.map((h) => [h.epoch, h.value])),
        lineChart("probe image over epochs", story.history.map((h) => [h.epoch, h.source])),
        table),
    );
  }
}

export async function render() {
  document.head.append(el("style", {}, STYLE));
  const dashboard = new Dashboard(document.body);
  window.deconvDashboard = dashboard; // for tests and the curious
  try {
    await dashboard.start();
  } catch (error) {
    dashboard.say(`Could not load: ${error.message}`);
  }
}
