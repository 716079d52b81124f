// Models (base and fine-tuned) and dedicated endpoints: create on a hardware option, start, stop,
// delete; states refresh every 2 s.
import { api, esc, statusBadge, toast } from "./api.js";

export async function render(view) {
  const [listed, hardware] = await Promise.all([api("/v1/models"), api("/v1/hardware")]);
  const models = listed.data || listed;
  view.innerHTML = `
    <h1>Models</h1>
    <table aria-label="Models"><thead><tr><th>Name</th><th>Kind</th><th>Owner</th><th class="num">Context</th><th></th></tr></thead><tbody>
      ${models.map((m) => `<tr><td>${esc(m.id)}</td><td>${m.owned_by === "tunehouse" ? "base" : "fine-tuned"}</td><td>${esc(m.owned_by)}</td>
        <td class="num">${esc(m.context_length)}</td><td><a href="#/playground?model=${encodeURIComponent(m.id)}">Chat</a></td></tr>`).join("")}
    </tbody></table>
    <h2>Dedicated endpoints</h2>
    <form id="ep-form" class="card row">
      <label>Model <select name="model">${models.map((m) => `<option>${esc(m.id)}</option>`).join("")}</select></label>
      <label>Hardware <select name="hardware">${hardware.data.map((h) => `<option value="${esc(h.id)}">${esc(h.id)} (${esc(h.specs.gpu_link)})</option>`).join("")}</select></label>
      <label>Name <input name="display_name" maxlength="256"></label>
      <label>Stop when idle (min) <input name="inactive_timeout" type="number" min="0" value="0"></label>
      <button type="submit">Create endpoint</button>
    </form>
    <table aria-label="Endpoints"><thead><tr><th>Name</th><th>Model</th><th>Hardware</th><th>State</th><th></th></tr></thead>
      <tbody id="ep-rows"></tbody></table>`;
  const rows = view.querySelector("#ep-rows");

  async function load() {
    const eps = (await api("/v1/endpoints")).data;
    rows.innerHTML = eps.map((e) => `<tr data-id="${esc(e.id)}"><td>${esc(e.display_name)}</td><td>${esc(e.model)}</td><td>${esc(e.hardware)}</td>
      <td>${statusBadge(e.state)} ${e.error ? `<span class="error">${esc(e.error)}</span>` : ""}</td>
      <td><button type="button" class="plain" data-state="STARTED">Start</button> <button type="button" class="plain" data-state="STOPPED">Stop</button>
      <button type="button" class="danger" data-act="delete">Delete</button></td></tr>`).join("")
      || `<tr><td colspan="5" class="muted">No endpoints.</td></tr>`;
  }

  rows.addEventListener("click", async (e) => {
    const id = e.target.closest("tr")?.dataset.id;
    try {
      if (e.target.dataset.state) await api(`/v1/endpoints/${id}`, { method: "PATCH", body: { state: e.target.dataset.state } });
      else if (e.target.dataset.act === "delete") await api(`/v1/endpoints/${id}`, { method: "DELETE" });
      else return;
      await load();
    } catch (err) { toast(err.message); }
  });
  view.querySelector("#ep-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = e.target;
    const body = { model: f.model.value, hardware: f.hardware.value, inactive_timeout: Number(f.inactive_timeout.value) };
    if (f.display_name.value) body.display_name = f.display_name.value;
    try { await api("/v1/endpoints", { method: "POST", body }); await load(); } catch (err) { toast(err.message); }
  });
  await load();
  const timer = setInterval(() => load().catch(() => {}), 2000);
  return () => clearInterval(timer); // a load in flight then only fills the detached table
}
