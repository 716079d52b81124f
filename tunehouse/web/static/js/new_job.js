// Start a job (or continue one from a checkpoint): the same body the together SDK posts.
import { api, esc, toast } from "./api.js";

export async function render(view, { params }) {
  const from = params.get("from") || "";
  const [models, files] = await Promise.all([api("/v1/fine-tunes/models/supported"), api("/v1/files")]);
  const usable = files.data.filter((f) => f.purpose === "fine-tune" && f.processing_status === "COMPLETED");
  const fileOptions = usable.map((f) => `<option value="${esc(f.id)}" ${f.id === params.get("file") ? "selected" : ""}>${esc(f.filename)} (${esc(f.id.slice(0, 13))}…, ${esc(f.validation_report?.dataset_format || "")})</option>`).join("");
  view.innerHTML = `
    <h1>${from ? `Continue from ${esc(from)}` : "New fine-tuning job"}</h1>
    <form id="job-form" class="card">
      <div class="row">
        ${from ? "" : `<label>Base model <select name="model">${models.models.map((m) => `<option>${esc(m)}</option>`).join("")}</select></label>`}
        <label>Training file <select name="training_file" required>${fileOptions}</select></label>
        <label>Validation file <select name="validation_file"><option value="">none</option>${fileOptions}</select></label>
        <label>Method <select name="method"><option value="sft">SFT</option><option value="dpo" ${from ? "selected" : ""}>DPO</option></select></label>
        <label class="inline"><input type="checkbox" name="lora" checked> LoRA</label>
        <label>LoRA rank <input name="lora_r" type="number" min="1" value="8"></label>
      </div>
      <div class="row">
        <label>Epochs <input name="n_epochs" type="number" min="1" value="1"></label>
        <label>Batch size <input name="batch_size" type="number" min="1" value="4"></label>
        <label>Learning rate <input name="learning_rate" type="number" step="any" value="0.0001"></label>
        <label>Checkpoints <input name="n_checkpoints" type="number" min="1" value="1"></label>
        <label>Evaluations <input name="n_evals" type="number" min="0" value="0"></label>
        <label>Suffix <input name="suffix" maxlength="40"></label>
      </div>
      <fieldset class="row" id="dpo-fields"><legend>DPO</legend>
        <label>dpo_beta <input name="dpo_beta" type="number" step="any" value="0.1"></label>
        <label>rpo_alpha <input name="rpo_alpha" type="number" step="any" value="0"></label>
        <label>simpo_gamma <input name="simpo_gamma" type="number" step="any" value="0"></label>
        <label class="inline"><input type="checkbox" name="dpo_normalize_logratios_by_length"> normalise by length</label>
      </fieldset>
      <p><button type="submit">Start job</button> <span id="job-error" class="error" role="alert"></span></p>
    </form>`;
  const form = view.querySelector("#job-form");
  const dpo = view.querySelector("#dpo-fields");
  const syncMethod = () => { dpo.hidden = form.method.value !== "dpo"; };
  form.method.addEventListener("change", syncMethod);
  syncMethod();
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const num = (name) => Number(form[name].value);
    const body = {
      training_file: form.training_file.value, n_epochs: num("n_epochs"), batch_size: num("batch_size"),
      learning_rate: num("learning_rate"), n_checkpoints: num("n_checkpoints"), n_evals: num("n_evals"),
      training_type: form.lora.checked ? { type: "Lora", lora_r: num("lora_r") } : { type: "Full" },
      training_method: form.method.value === "dpo"
        ? { method: "dpo", dpo_beta: num("dpo_beta"), rpo_alpha: num("rpo_alpha"), simpo_gamma: num("simpo_gamma"),
            dpo_normalize_logratios_by_length: form.dpo_normalize_logratios_by_length.checked }
        : { method: "sft" },
    };
    if (from) body.from_checkpoint = from; else body.model = form.model.value;
    if (form.validation_file.value) body.validation_file = form.validation_file.value;
    if (form.suffix.value) body.suffix = form.suffix.value;
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    submit.textContent = "Starting…"; // the first job on a model may load or convert it first
    try {
      const job = await api("/v1/fine-tunes", { method: "POST", body });
      toast(`Started ${job.id}`);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      view.querySelector("#job-error").textContent = err.message;
      submit.disabled = false;
      submit.textContent = "Start job";
    }
  });
}
