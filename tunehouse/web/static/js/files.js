// Files: list, upload with a progress bar through the SDKs' three-step flow (announce → PUT the
// bytes to the signed URL → preprocess), and each file's validation report, every error by line.
import { api, ApiError, esc, statusBadge, toast } from "./api.js";

async function sha256(file) {
  if (!crypto.subtle) return null; // only in secure contexts (https or loopback); the checksum is optional
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// XMLHttpRequest, not fetch: only it reports upload progress.
function put(url, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => (xhr.status === 200 ? resolve() : reject(new Error(`upload failed: HTTP ${xhr.status} ${xhr.responseText}`)));
    xhr.onerror = () => reject(new Error("upload failed: network error"));
    xhr.send(file);
  });
}

export async function upload(file, purpose, onProgress) {
  const type = file.name.split(".").pop().toLowerCase();
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file_name", file.name);
  form.append("file_type", type);
  const checksum = await sha256(file);
  if (checksum) form.append("checksum", checksum);
  let begun;
  try {
    begun = await api("/v1/files", { method: "POST", body: form });
  } catch (err) {
    if (err instanceof ApiError && err.status === 409 && err.body?.file_id) return api(`/v1/files/${err.body.file_id}`);
    throw err;
  }
  await put(begun.upload_url, file, onProgress);
  return api(`/v1/files/${begun.id}/preprocess`, { method: "POST" });
}

function report(f) {
  const r = f.validation_report;
  if (!r) return `<p class="muted">Not validated yet.</p>`;
  const errors = r.errors || [];
  return `<p>${r.valid ? "Valid" : `<strong class="error">Invalid</strong>`} · format ${esc(r.dataset_format || "unknown")} · ${esc(r.nlines ?? "?")} lines</p>
    ${errors.length ? `<table aria-label="Validation errors"><thead><tr><th>Line</th><th>Field</th><th>Rule</th><th>Message</th></tr></thead><tbody>
      ${errors.map((e) => `<tr class="problem"><td class="num">${esc(e.line ?? "–")}</td><td><code>${esc(e.field ?? "")}</code></td><td>${esc(e.rule)}</td><td>${esc(e.message)}</td></tr>`).join("")}
    </tbody></table>` : ""}
    ${r.valid && f.purpose === "fine-tune" ? `<p><a class="button" href="#/new?file=${esc(f.id)}">Fine-tune on this file</a></p>` : ""}`;
}

export async function render(view) {
  view.innerHTML = `
    <h1>Files</h1>
    <form id="upload-form" class="card row">
      <label>Dataset (.jsonl, .parquet, .csv) <input id="upload-file" type="file" accept=".jsonl,.parquet,.csv" required></label>
      <label>Purpose <select id="upload-purpose"><option>fine-tune</option><option>eval</option></select></label>
      <button type="submit">Upload</button>
      <progress id="upload-progress" max="1" value="0" aria-label="upload progress" hidden></progress>
      <span id="upload-status" role="status"></span>
    </form>
    <table aria-label="Files"><thead><tr><th>File</th><th>Name</th><th>Purpose</th><th class="num">Bytes</th><th class="num">Lines</th><th>Status</th><th></th></tr></thead>
      <tbody id="file-rows"></tbody></table>
    <section id="report" class="card" hidden aria-live="polite"></section>`;
  const rows = view.querySelector("#file-rows");
  let files = [];

  function showReport(f) {
    const box = view.querySelector("#report");
    box.hidden = false;
    box.innerHTML = `<h2>Validation report: ${esc(f.filename)} <span class="muted">${esc(f.id)}</span></h2>${report(f)}`;
  }

  async function load() {
    files = (await api("/v1/files")).data.sort((a, b) => b.created_at - a.created_at);
    rows.innerHTML = files.map((f) => `<tr data-id="${esc(f.id)}">
      <td><code>${esc(f.id.slice(0, 13))}…</code></td><td>${esc(f.filename)}</td><td>${esc(f.purpose)}</td>
      <td class="num">${esc(f.bytes)}</td><td class="num">${esc(f.LineCount)}</td><td>${statusBadge(f.processing_status)}</td>
      <td><button type="button" class="plain" data-act="report">Report</button> <button type="button" class="danger" data-act="delete">Delete</button></td></tr>`).join("")
      || `<tr><td colspan="7" class="muted">No files yet.</td></tr>`;
  }

  rows.addEventListener("click", async (e) => {
    const act = e.target.dataset.act;
    if (!act) return;
    const f = files.find((x) => x.id === e.target.closest("tr").dataset.id);
    if (act === "report") showReport(f);
    if (act === "delete") {
      try { await api(`/v1/files/${f.id}`, { method: "DELETE" }); await load(); } catch (err) { toast(err.message); }
    }
  });

  view.querySelector("#upload-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const file = view.querySelector("#upload-file").files[0];
    const bar = view.querySelector("#upload-progress");
    const status = view.querySelector("#upload-status");
    bar.hidden = false;
    bar.value = 0;
    status.textContent = "Uploading…";
    try {
      const f = await upload(file, view.querySelector("#upload-purpose").value, (p) => { bar.value = p; });
      bar.value = 1;
      status.textContent = f.validation_report?.valid ? `Uploaded ${f.id}: valid` : `Uploaded ${f.id}: invalid, see the report`;
      await load();
      showReport(f);
    } catch (err) {
      status.textContent = err.message;
      status.className = "error";
    }
  });
  await load();
}
