// One job: hyperparameters, live curves, events and checkpoints, polled every second while it
// runs (only new metric rows and events are fetched), and the actions a job allows.
import { api, esc, statusBadge, toast, TERMINAL } from "./api.js";
import { JobCharts } from "./charts.js";

const HYPER = ["model", "training_file", "validation_file", "n_epochs", "n_checkpoints", "n_evals", "batch_size",
  "learning_rate", "lr_scheduler", "warmup_ratio", "max_grad_norm", "weight_decay", "max_seq_length", "packing",
  "train_on_inputs", "random_seed", "from_checkpoint", "total_steps", "token_count", "param_count"];

function value(v) {
  if (v == null || v === "") return `<span class="muted">–</span>`;
  if (typeof v === "object") return esc(JSON.stringify(v));
  return esc(v);
}

function download(id, step) {
  return `/v1/finetune/download?ft_id=${encodeURIComponent(id)}${step ? `&checkpoint_step=${step}` : ""}`;
}

export async function render(view, { id }) {
  let job;
  // The job and its curves' rows in parallel: with 10,000 rows the rows are what the page waits for.
  const firstRows = api(`/v1/fine-tunes/${id}/metrics`).catch(() => ({ metrics: [] }));
  try {
    job = await api(`/v1/fine-tunes/${id}`);
  } catch (err) {
    view.innerHTML = `<h1>Job not found</h1><p class="error" role="alert">${esc(err.message)}</p>`;
    return;
  }
  view.innerHTML = `
    <h1>${esc(job.id)} <span id="status"></span></h1>
    <p class="muted" id="output"></p>
    <div class="row card" id="actions">
      <button id="cancel" type="button" class="danger">Cancel</button>
      <button id="delete" type="button" class="danger">Delete</button>
      <a id="download" class="button plain" download>Download model</a>
      <a class="button plain" href="#/new?from=${esc(job.id)}">Continue training</a>
      <a id="play" class="button plain">Open in playground</a>
      <span id="progress" class="muted"></span>
    </div>
    <h2>Curves</h2>
    <div class="grid" id="charts" aria-live="off"><p class="muted" id="no-metrics">No metrics yet.</p></div>
    <div class="grid">
      <section><h2>Events</h2><ol class="events" id="events" aria-live="polite"></ol></section>
      <section><h2>Checkpoints</h2><table aria-label="Checkpoints"><thead><tr><th>Step</th><th>Type</th><th>Created</th><th></th></tr></thead>
        <tbody id="checkpoints"></tbody></table></section>
    </div>
    <h2>Hyperparameters</h2><dl class="kv card" id="hyper"></dl>`;
  const charts = new JobCharts(view.querySelector("#charts"));
  let shownEvents = 0;
  let timer = null;
  let stopped = false;

  function drawJob() {
    view.querySelector("#status").innerHTML = statusBadge(job.status);
    view.querySelector("#output").textContent = `${job.model_output_name} · from ${job.model}`;
    view.querySelector("#progress").textContent = job.total_steps ? `step ${job.steps_completed || 0} of ${job.total_steps}` : "";
    view.querySelector("#cancel").disabled = TERMINAL.has(job.status) || job.status === "cancel_requested";
    const done = job.status === "completed";
    view.querySelector("#download").toggleAttribute("hidden", !done);
    view.querySelector("#download").href = download(job.id);
    view.querySelector("#play").toggleAttribute("hidden", !done);
    view.querySelector("#play").href = `#/playground?model=${encodeURIComponent(job.model_output_name)}&base=${encodeURIComponent(job.model)}`;
    const method = job.training_method || {};
    const rows = [...HYPER.map((k) => [k, job[k]]), ["training_type", job.training_type], ["training_method", method]];
    view.querySelector("#hyper").innerHTML = rows.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${value(v)}</dd>`).join("");
    const events = job.events || [];
    const list = view.querySelector("#events");
    for (const e of events.slice(shownEvents)) {
      const li = document.createElement("li");
      li.innerHTML = `<time datetime="${esc(e.created_at)}">${esc(e.created_at.slice(11, 19))}</time>` +
        `<strong>${esc(e.type || "")}</strong> ${esc(e.message)}`;
      list.append(li);
      list.scrollTop = list.scrollHeight;
    }
    shownEvents = Math.max(shownEvents, events.length);
  }

  async function loadMetrics(pending) {
    const from = charts.lastStep + 1;
    const rows = (await (pending || api(`/v1/fine-tunes/${id}/metrics?global_step_from=${from}`))).metrics;
    if (stopped) return;
    if (rows.length) view.querySelector("#no-metrics")?.remove();
    charts.add(rows);
  }

  async function loadCheckpoints() {
    const cps = (await api(`/v1/fine-tunes/${id}/checkpoints`)).data;
    if (stopped) return;
    view.querySelector("#checkpoints").innerHTML = cps.map((c) => {
      const step = /intermediate/i.test(c.checkpoint_type) ? c.step : 0;
      return `<tr><td class="num">${esc(c.step)}</td><td>${esc(c.checkpoint_type)}</td><td>${esc(c.created_at.slice(0, 19).replace("T", " "))}</td>
        <td><a href="${esc(download(job.id, step))}" download>Download</a> ·
        <a href="#/new?from=${esc(step ? `${job.id}:${step}` : job.id)}">Continue</a></td></tr>`;
    }).join("") || `<tr><td colspan="4" class="muted">None yet.</td></tr>`;
  }

  async function tick(first = false) {
    try {
      if (!first) job = await api(`/v1/fine-tunes/${id}`);
      if (stopped) return;
      drawJob();
      await Promise.all([loadMetrics(first ? firstRows : null), loadCheckpoints()]);
    } catch (err) {
      toast(err.message);
    }
    if (!stopped && !TERMINAL.has(job.status)) timer = setTimeout(tick, 1000);
  }

  view.querySelector("#cancel").addEventListener("click", async () => {
    try { job = await api(`/v1/fine-tunes/${id}/cancel`, { method: "POST" }); drawJob(); } catch (err) { toast(err.message); }
  });
  view.querySelector("#delete").addEventListener("click", async () => {
    if (!confirm(`Delete ${id} and its weights?`)) return;
    try { await api(`/v1/fine-tunes/${id}`, { method: "DELETE" }); location.hash = "#/jobs"; } catch (err) { toast(err.message); }
  });
  await tick(true);
  return () => { stopped = true; clearTimeout(timer); charts.destroy(); };
}
