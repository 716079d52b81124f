// Metric curves with uPlot (vendored, global `uPlot`). Rows are /metrics rows: {"train/global_step",
// name: number, ...}. Keys are grouped so that train_X and valid_X (or valid/X) share a chart, and
// DPO's "logps/chosen" and "logps/rejected" share one.
const COLORS = ["#2457c5", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#e67700", "#495057"];
const SKIP = /(step|epoch|timestamp)$/;

export function groupOf(key) {
  const name = key.replace(/^(train|valid|eval)[_/]/, ""); // train and validation share a chart
  const parts = name.split("/");
  const side = parts[parts.length - 1];
  if (parts.length > 1 && (side === "chosen" || side === "rejected")) {
    return `${parts.slice(0, -1).join("/")} (chosen, rejected)`; // DPO: both sides on one chart
  }
  return name;
}

export function plottable(row) {
  return Object.keys(row).filter((k) => !SKIP.test(k) && typeof row[k] === "number");
}

// Steps are integers: tick only at whole numbers.
const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

function options(labels, width, many) {
  return {
    width, height: 220,
    scales: { x: { time: false } },
    axes: [{ label: "step", incrs: STEP_INCRS }, { size: 60 }],
    cursor: { drag: { x: true, y: false } },
    series: [{ label: "step" }, ...labels.map((label, i) => ({
      label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
      points: { show: !many },
    }))],
  };
}

// One chart: a container element with data-points (the count of drawn points of its first
// series, which tests and the bench read) and a uPlot inside.
class Chart {
  constructor(parent, title, labels) {
    this.el = document.createElement("figure");
    this.el.className = "chart";
    this.el.dataset.metric = title;
    this.el.innerHTML = `<h3></h3>`;
    this.el.querySelector("h3").textContent = title;
    parent.append(this.el);
    this.title = title;
    this.labels = labels;
    this.plot = null;
  }

  set(data) {
    const n = data[0].length;
    this.el.dataset.points = String(data[1] ? data[1].filter((v) => v != null).length : 0);
    // The canvas says nothing to a screen reader: the figure's label gives each series' last value.
    this.el.setAttribute("aria-label", `${this.title}: ` + this.labels.map((label, i) => {
      const col = data[i + 1] || [];
      let j = col.length - 1;
      while (j >= 0 && col[j] == null) j--;
      return j < 0 ? `${label} no data` : `${label} ${Number(col[j]).toPrecision(4)} at step ${data[0][j]}`;
    }).join("; "));
    if (this.plot && this.plot.series.length - 1 !== data.length - 1) { this.plot.destroy(); this.plot = null; }
    if (!this.plot) {
      this.plot = new uPlot(options(this.labels, this.width(), n > 200), data, this.el);
      // Follow the grid column's width (window resizes, sidebars); uPlot draws at a fixed size.
      this.resize = new ResizeObserver(() => this.plot?.setSize({ width: this.width(), height: 220 }));
      this.resize.observe(this.el);
    } else {
      this.plot.setData(data);
    }
  }

  width() { return Math.max(280, this.el.clientWidth - 16); }

  destroy() { this.resize?.disconnect(); this.plot?.destroy(); this.plot = null; }
}

// Live charts of one job: append rows as they arrive, redraw each group's chart.
export class JobCharts {
  constructor(parent) {
    this.parent = parent;
    this.steps = [];
    this.columns = new Map(); // key -> values aligned with steps (null where a row lacks the key)
    this.charts = new Map(); // group -> Chart
  }

  get lastStep() { return this.steps.length ? this.steps[this.steps.length - 1] : -1; }

  add(rows) {
    for (const row of rows) {
      const step = row["train/global_step"];
      if (step <= this.lastStep) continue;
      for (const key of plottable(row)) {
        if (!this.columns.has(key)) this.columns.set(key, new Array(this.steps.length).fill(null));
      }
      this.steps.push(step);
      for (const [key, values] of this.columns) values.push(row[key] ?? null);
    }
    if (rows.length) this.draw();
  }

  draw() {
    const groups = new Map();
    for (const key of this.columns.keys()) {
      const g = groupOf(key);
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(key);
    }
    for (const [group, keys] of groups) {
      let chart = this.charts.get(group);
      if (chart && chart.labels.length !== keys.length) { chart.destroy(); chart.el.remove(); chart = null; }
      if (!chart) { chart = new Chart(this.parent, group, keys); this.charts.set(group, chart); }
      chart.set([this.steps, ...keys.map((k) => this.columns.get(k))]);
    }
  }

  destroy() { for (const c of this.charts.values()) c.destroy(); }
}

// Several jobs on one chart per metric key: series aligned on the union of their steps.
export function drawComparison(parent, runs) {
  const keys = [];
  for (const run of runs) for (const row of run.rows) for (const k of plottable(row)) if (!keys.includes(k)) keys.push(k);
  const charts = [];
  for (const key of keys) {
    const tables = runs.map((run) => {
      const rows = run.rows.filter((r) => typeof r[key] === "number");
      return [rows.map((r) => r["train/global_step"]), rows.map((r) => r[key])];
    });
    const chart = new Chart(parent, key, runs.map((r) => r.label));
    chart.set(uPlot.join(tables));
    charts.push(chart);
  }
  return charts;
}
