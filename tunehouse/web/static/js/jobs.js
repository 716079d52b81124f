// Jobs list: filter by status and text, page through, pick several to compare; refreshes every 3 s.
import { api, esc, age, statusBadge } from "./api.js";

const PAGE = 20;

function method(job) {
  const m = job.training_method?.method || "sft";
  return `${m.toUpperCase()} · ${job.training_type?.type || "Full"}`;
}

function progress(job) {
  const total = job.total_steps || 0;
  const done = job.steps_completed || 0;
  if (!total) return `<span class="muted">–</span>`;
  return `<progress max="${total}" value="${done}" aria-label="steps"></progress> ${done}/${total}`;
}

export async function render(view, { params }) {
  let page = Number(params.get("page") || 0);
  view.innerHTML = `
    <h1>Fine-tuning jobs</h1>
    <div class="row card">
      <label>Status <select id="f-status"><option value="">any</option>
        ${["pending", "queued", "running", "completed", "cancelled", "error", "user_error"].map((s) => `<option>${s}</option>`).join("")}
      </select></label>
      <label>Search <input id="f-text" type="search" placeholder="model, output name or id"></label>
      <a class="button" href="#/new">New job</a>
      <button id="compare" type="button" class="plain" disabled>Compare selected</button>
    </div>
    <table aria-label="Jobs">
      <thead><tr><th scope="col"><span class="sr-only">Select</span></th><th>Job</th><th>Status</th><th>Model</th><th>Method</th>
      <th>Progress</th><th>Age</th><th>Output name</th></tr></thead>
      <tbody id="rows"></tbody>
    </table>
    <div class="row"><button id="prev" class="plain" type="button">Previous</button>
      <span id="page-info" class="muted"></span><button id="next" class="plain" type="button">Next</button></div>`;
  const selected = new Set();
  let jobs = [];
  const rows = view.querySelector("#rows");

  function draw() {
    const status = view.querySelector("#f-status").value;
    const text = view.querySelector("#f-text").value.toLowerCase();
    const shown = jobs.filter((j) => (!status || j.status === status) &&
      (!text || [j.id, j.model, j.model_output_name].join(" ").toLowerCase().includes(text)));
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    rows.innerHTML = shown.slice(page * PAGE, page * PAGE + PAGE).map((j) => `
      <tr data-id="${esc(j.id)}">
        <td><input type="checkbox" aria-label="select ${esc(j.id)}" ${selected.has(j.id) ? "checked" : ""}></td>
        <td><a href="#/jobs/${esc(j.id)}">${esc(j.id.slice(0, 11))}…</a></td>
        <td>${statusBadge(j.status)}</td><td>${esc(j.model)}</td><td>${esc(method(j))}</td>
        <td>${progress(j)}</td><td>${esc(age(j.created_at))}</td><td>${esc(j.model_output_name)}</td>
      </tr>`).join("") || `<tr><td colspan="8" class="muted">No jobs yet: upload a file, then start one.</td></tr>`;
    view.querySelector("#page-info").textContent = `page ${page + 1} of ${pages} · ${shown.length} jobs`;
    view.querySelector("#prev").disabled = page === 0;
    view.querySelector("#next").disabled = page >= pages - 1;
  }

  let alive = true;
  async function load() {
    const listed = (await api("/v1/fine-tunes")).data;
    if (!alive) return; // the page was left while the list was on its way
    jobs = listed.sort((a, b) => b.created_at.localeCompare(a.created_at));
    draw();
  }

  rows.addEventListener("change", (e) => {
    const id = e.target.closest("tr").dataset.id;
    e.target.checked ? selected.add(id) : selected.delete(id);
    view.querySelector("#compare").disabled = selected.size < 2;
  });
  view.querySelector("#compare").addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  });
  view.querySelector("#f-status").addEventListener("change", () => { page = 0; draw(); });
  view.querySelector("#f-text").addEventListener("input", () => { page = 0; draw(); });
  view.querySelector("#prev").addEventListener("click", () => { page--; draw(); });
  view.querySelector("#next").addEventListener("click", () => { page++; draw(); });
  await load();
  const timer = setInterval(() => load().catch(() => {}), 3000);
  return () => { alive = false; clearInterval(timer); };
}
