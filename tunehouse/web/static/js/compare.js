// Compare runs: pick jobs, overlay their curves, one chart per metric.
import { api, esc, statusBadge } from "./api.js";
import { drawComparison } from "./charts.js";

export async function render(view, { params }) {
  const ids = (params.get("ids") || "").split(",").filter(Boolean);
  const jobs = (await api("/v1/fine-tunes")).data.sort((a, b) => b.created_at.localeCompare(a.created_at));
  view.innerHTML = `
    <h1>Compare runs</h1>
    <form id="pick" class="card"><fieldset><legend>Jobs</legend>
      ${jobs.map((j) => `<label class="inline"><input type="checkbox" name="job" value="${esc(j.id)}" ${ids.includes(j.id) ? "checked" : ""}>
        ${esc(j.model_output_name)} ${statusBadge(j.status)}</label><br>`).join("") || `<p class="muted">No jobs yet.</p>`}
    </fieldset><button type="submit">Compare</button></form>
    <div class="grid" id="compare-charts"></div>`;
  view.querySelector("#pick").addEventListener("submit", (e) => {
    e.preventDefault();
    const picked = [...view.querySelectorAll("input[name=job]:checked")].map((i) => i.value);
    location.hash = `#/compare?ids=${picked.join(",")}`;
  });
  if (!ids.length) return;
  const runs = await Promise.all(ids.map(async (id) => {
    const job = jobs.find((j) => j.id === id);
    const rows = (await api(`/v1/fine-tunes/${id}/metrics`)).metrics;
    return { label: job ? `${job.model_output_name}` : id, rows };
  }));
  const charts = drawComparison(view.querySelector("#compare-charts"), runs);
  return () => charts.forEach((c) => c.destroy());
}
