// Playground: one prompt sent to one or two models at once (e.g. base and fine-tuned side by
// side), answers streamed token by token, each pane keeping its own conversation.
import { api, esc, toast } from "./api.js";
import { streamChat } from "./sse.js";

function pane(index, models, selected) {
  return `<section class="pane" data-pane="${index}" aria-label="Model ${index + 1}">
    <label>Model <select class="model">${models.map((m) => `<option ${m === selected ? "selected" : ""}>${esc(m)}</option>`).join("")}</select></label>
    <div class="transcript" aria-live="polite"></div></section>`;
}

export async function render(view, { params }) {
  const listed = await api("/v1/models");
  const models = (listed.data || listed).map((m) => m.id);
  const first = params.get("model") || models[0];
  const second = params.get("base") || models.find((m) => m !== first) || first;
  view.innerHTML = `
    <h1>Playground</h1>
    <div class="card row">
      <label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
      <label>Top-p <input id="top_p" type="number" min="0" max="1" step="0.05" value="1"></label>
      <label>Max tokens <input id="max_tokens" type="number" min="1" value="64"></label>
      <label class="inline"><input id="side" type="checkbox" ${params.get("base") ? "checked" : ""}> Two models side by side</label>
      <button id="clear" type="button" class="plain">Clear</button>
    </div>
    <label style="width:100%">System prompt <textarea id="system" rows="2" placeholder="optional"></textarea></label>
    <div class="panes" id="panes">${pane(0, models, first)}${pane(1, models, second)}</div>
    <form id="chat-form" class="row" style="margin-top:.6rem">
      <label style="flex:1">Message <textarea id="prompt" rows="2" required></textarea></label>
      <button type="submit" id="send">Send</button>
    </form>`;
  const panes = [...view.querySelectorAll(".pane")];
  const histories = [[], []];
  const side = view.querySelector("#side");
  const syncSide = () => { panes[1].hidden = !side.checked; };
  side.addEventListener("change", syncSide);
  syncSide();
  const controller = new AbortController();

  function bubble(p, role, text) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    div.textContent = text;
    p.querySelector(".transcript").append(div);
    return div;
  }

  async function ask(i, prompt) {
    const p = panes[i];
    histories[i].push({ role: "user", content: prompt });
    bubble(p, "user", prompt);
    const out = bubble(p, "assistant", "");
    out.dataset.pieces = "0";
    const system = view.querySelector("#system").value.trim();
    const body = {
      model: p.querySelector(".model").value,
      messages: [...(system ? [{ role: "system", content: system }] : []), ...histories[i]],
      temperature: Number(view.querySelector("#temperature").value),
      top_p: Number(view.querySelector("#top_p").value),
      max_tokens: Number(view.querySelector("#max_tokens").value),
    };
    try {
      await streamChat(body, (piece) => {
        out.textContent += piece;
        out.dataset.pieces = String(Number(out.dataset.pieces) + 1);
      }, controller.signal);
      out.dataset.done = "1";
      histories[i].push({ role: "assistant", content: out.textContent });
    } catch (err) {
      if (err.name !== "AbortError") { out.classList.add("error"); out.textContent = err.message; toast(err.message); }
    }
  }

  view.querySelector("#chat-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const prompt = view.querySelector("#prompt").value.trim();
    if (!prompt) return;
    view.querySelector("#prompt").value = "";
    view.querySelector("#send").disabled = true;
    await Promise.all(panes.map((p, i) => (p.hidden ? null : ask(i, prompt))));
    view.querySelector("#send").disabled = false;
  });
  view.querySelector("#clear").addEventListener("click", () => {
    histories.forEach((h) => h.splice(0));
    panes.forEach((p) => { p.querySelector(".transcript").innerHTML = ""; });
  });
  return () => controller.abort();
}
