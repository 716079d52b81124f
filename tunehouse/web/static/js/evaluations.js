// Evaluations posted by `tunehouse eval`: a table per run and a bar chart per metric.
import { api, esc } from "./api.js";

const METRICS = [["exact_match", "Exact match", true], ["f1", "Token F1", true], ["valid_loss", "Validation loss", false], ["perplexity", "Perplexity", false]];

function fmt(v) { return v == null ? "n/a" : Number(v).toFixed(4); }

function bars(models, key, title, higherBetter) {
  const values = models.map((m) => m[key]).filter((v) => v != null);
  const max = Math.max(...values, 1e-9);
  return `<figure class="chart" data-metric="${esc(key)}"><h3>${esc(title)} <span class="muted">(${higherBetter ? "higher" : "lower"} is better)</span></h3><div class="bars">
    ${models.map((m) => `<div class="bar"><span>${esc(m.label || m.model)}</span><span><span class="fill" style="width:${m[key] == null ? 0 : (100 * m[key]) / max}%"></span></span><span class="num">${fmt(m[key])}</span></div>`).join("")}
  </div></figure>`;
}

export async function render(view) {
  const runs = (await api("/v1/evaluations")).data;
  view.innerHTML = `<h1>Evaluations</h1>` + (runs.length ? runs.map((r) => `
    <section class="card" data-eval="${esc(r.id)}">
      <h2>${esc(r.file)} <span class="muted">${esc(r.created_at.slice(0, 19).replace("T", " "))} · ${esc(r.id)}</span></h2>
      <table aria-label="Evaluation ${esc(r.id)}"><thead><tr><th>Model</th><th class="num">EM</th><th class="num">F1</th><th class="num">Valid loss</th><th class="num">Perplexity</th><th class="num">Turns</th></tr></thead><tbody>
        ${r.models.map((m) => `<tr><td>${esc(m.label || m.model)}</td><td class="num">${fmt(m.exact_match)}</td><td class="num">${fmt(m.f1)}</td><td class="num">${fmt(m.valid_loss)}</td><td class="num">${fmt(m.perplexity)}</td><td class="num">${esc(m.n_turns)}</td></tr>`).join("")}
      </tbody></table>
      <div class="grid">${METRICS.map(([k, t, up]) => bars(r.models, k, t, up)).join("")}</div>
    </section>`).join("") : `<p class="muted">No evaluations yet: run <code>tunehouse eval --model A --model B --file held_out.jsonl</code> against this server.</p>`);
}
