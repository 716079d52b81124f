// Every call the dashboard makes goes through here: the public API, authenticated by the
// HttpOnly session cookie; the custom header marks our own state-changing requests (see api/auth.py).
export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { "X-Tunehouse-Web": "1" };
  if (body !== undefined && !(body instanceof FormData)) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, signal, credentials: "same-origin",
    body: body === undefined || body instanceof FormData ? body : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Text-safe templating: everything interpolated from the API goes through esc().
export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export function toast(message) {
  const box = document.getElementById("toast");
  const item = document.createElement("div");
  item.textContent = message;
  box.append(item);
  setTimeout(() => item.remove(), 6000);
}

export function age(iso) {
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

export const TERMINAL = new Set(["completed", "cancelled", "error", "user_error"]);

export function statusBadge(status) {
  return `<span class="status ${esc(status)}">${esc(status)}</span>`;
}
