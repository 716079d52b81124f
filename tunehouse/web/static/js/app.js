// The shell: checks the session, shows sign-in or the page named by the URL hash, and stops a
// page's timers when the user leaves it (each page returns a cleanup function).
import { api, esc } from "./api.js";

const routes = [
  [/^#\/jobs\/(ft-[\w-]+)$/, () => import("./job.js")],
  [/^#\/jobs$/, () => import("./jobs.js")],
  [/^#\/new$/, () => import("./new_job.js")],
  [/^#\/compare$/, () => import("./compare.js")],
  [/^#\/files$/, () => import("./files.js")],
  [/^#\/models$/, () => import("./models.js")],
  [/^#\/playground$/, () => import("./playground.js")],
  [/^#\/evaluations$/, () => import("./evaluations.js")],
];

const view = document.getElementById("view");
let cleanup = null;
let me = null;
let visits = 0; // counts navigations, so a slow page that finishes late does not take over

function query() {
  const hash = location.hash || "#/jobs";
  const at = hash.indexOf("?");
  return { path: at < 0 ? hash : hash.slice(0, at), params: new URLSearchParams(at < 0 ? "" : hash.slice(at + 1)) };
}

async function show() {
  if (cleanup) { cleanup(); cleanup = null; }
  if (!me) return signIn();
  const { path, params } = query();
  for (const a of document.querySelectorAll("#nav a")) {
    a.toggleAttribute("aria-current", path.startsWith(a.getAttribute("href")));
    if (a.hasAttribute("aria-current")) a.setAttribute("aria-current", "page");
  }
  const route = routes.find(([re]) => re.test(path));
  if (!route) { location.hash = "#/jobs"; return; }
  const match = path.match(route[0]);
  const visit = ++visits;
  const page = await route[1]();
  if (visit !== visits) return; // the user has moved on while the module loaded
  // Each visit renders into its own element: a page left while it awaited data then writes into
  // a detached element, never over the page that replaced it.
  const root = document.createElement("div");
  view.replaceChildren(root);
  const done = (await page.render(root, { id: match[1], params, me })) || null;
  if (visit === visits) cleanup = done;
  else if (done) done(); // left while the page was loading: stop its timers at once
}

function signIn(error = "") {
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  view.innerHTML = `
    <section class="card signin" aria-labelledby="signin-title">
      <h1 id="signin-title">Sign in</h1>
      <form id="signin-form">
        <label>API key <input id="api-key" name="api_key" type="password" autocomplete="current-password" required></label>
        <button type="submit">Sign in</button>
        <p id="signin-error" class="error" role="alert">${esc(error)}</p>
        <p class="muted">Create a key with <code>tunehouse keys create --owner NAME</code>; the admin key is in <code>~/.tunehouse/admin.key</code>.</p>
      </form>
    </section>`;
  document.getElementById("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const who = await api("/ui/session", { method: "POST", body: { api_key: document.getElementById("api-key").value } });
      await start(who.owner);
    } catch (err) {
      document.getElementById("signin-error").textContent = err.message;
    }
  });
}

async function start(owner) {
  me = owner;
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("who").textContent = `signed in as ${owner}`;
  await show();
}

document.getElementById("sign-out").addEventListener("click", async () => {
  await api("/ui/session", { method: "DELETE" });
  me = null;
  location.hash = "";
  signIn();
});

window.addEventListener("hashchange", show);

try {
  const who = await api("/v3/whoami");
  await start(who.organization.name);
} catch {
  signIn();
}
