// The dashboard: a job list that polls /api/jobs, a job page that follows /api/jobs/ID/events (SSE),
// and a form that queues a workspace pipeline. Authentication rides on the cookie that /?token=... sets.
"use strict";

const view = document.getElementById("view");
let stopPage = () => {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function bar(fraction) {
  const pct = Math.round((fraction || 0) * 100);
  return el("div", { class: "bar", "data-fraction": String(fraction || 0) },
    el("div", { class: "fill", style: `width:${pct}%` }), el("div", { class: "label" }, `${pct}%`));
}

function rates(p) {
  if (p.rows_total != null) return `${p.stage || ""} ${p.rows_done}/${p.rows_total} rows, ${p.rows_per_s} rows/s, ${p.tokens_per_s} tok/s, ${p.failures} failed`;
  if (p.step != null) return `step ${p.step}${p.max_steps ? "/" + p.max_steps : ""}${p.loss != null ? ", loss " + p.loss.toFixed(4) : ""}`;
  return "";
}

// -- the job list and the form

async function listPage() {
  const table = el("tbody", { id: "jobs" });
  const message = el("div", { class: "error", id: "form-error" });
  const pipeline = el("select", { name: "pipeline", id: "pipeline" });
  const limit = el("input", { name: "limit", id: "limit", type: "number", min: "1", placeholder: "all prompts" });
  const overrides = el("textarea", { name: "set", id: "set", placeholder: "one KEY.PATH=VALUE a line, as cai run --set" });
  const form = el("form", { id: "submit-form", onsubmit: async (event) => {
    event.preventDefault();
    message.textContent = "";
    const body = { pipeline: pipeline.value, set: overrides.value.split("\n").map((s) => s.trim()).filter(Boolean) };
    if (limit.value) body.limit = Number(limit.value);
    try { await api("/api/jobs/run", { method: "POST", body: JSON.stringify(body) }); refresh(); }
    catch (e) { message.textContent = e.message; }
  } },
    el("label", { for: "pipeline" }, "pipeline"), pipeline,
    el("label", { for: "limit" }, "limit"), limit,
    el("label", { for: "set" }, "overrides"), overrides,
    el("span"), el("div", {}, el("button", { type: "submit", id: "start" }, "Start run"), " ", message));
  view.replaceChildren(
    el("h2", {}, "Start a pipeline"), form,
    el("h2", {}, "Jobs"),
    el("table", {}, el("thead", {}, el("tr", {}, ...["job", "status", "kind", "file", "output", "progress", ""].map((h) => el("th", {}, h)))), table));

  api("/api/pipelines").then((found) => {
    pipeline.replaceChildren(...found.map((p) => el("option", { value: p.path }, `${p.path} (${p.name}: ${p.stages.join(" → ")})`)));
  }).catch((e) => { message.textContent = e.message; });

  async function refresh() {
    const jobs = await api("/api/jobs");
    table.replaceChildren(...jobs.slice().reverse().map((job) => el("tr", { "data-job-id": String(job.id), "data-status": job.status },
      el("td", {}, el("a", { href: `#/jobs/${job.id}` }, `#${job.id}`)),
      el("td", { class: `status ${job.status}` }, job.status),
      el("td", {}, job.kind), el("td", {}, job.target), el("td", {}, job.out_dir),
      el("td", {}, bar(job.progress.fraction), el("div", { class: "muted" }, rates(job.progress))),
      el("td", {}, job.error ? el("span", { class: "error" }, job.error) : ""))));
  }
  const timer = setInterval(() => refresh().catch(() => {}), 1000);
  stopPage = () => clearInterval(timer);
  await refresh();
}

// -- one job

async function jobPage(id) {
  const job = await api(`/api/jobs/${id}`);
  const progress = el("div", { id: "job-progress" });
  const status = el("span", { id: "job-status" });
  const details = el("div", { id: "job-details" });
  view.replaceChildren(el("h2", {}, `Job #${job.id}: `, status), el("div", { class: "muted" }, job.command.join(" ")), progress, details);

  async function render(event) {
    status.className = `status ${event.status}`;
    status.textContent = event.status;
    progress.replaceChildren(bar(event.fraction), el("div", { class: "muted" }, rates(event)),
      event.error ? el("div", { class: "error" }, event.error) : "");
  }
  async function renderDetails() {
    const full = await api(`/api/jobs/${id}`);
    const actions = [];
    if (["queued", "running"].includes(full.status))
      actions.push(el("button", { id: "cancel", onclick: () => api(`/api/jobs/${id}/cancel`, { method: "POST" }).then(renderDetails) }, "Cancel"));
    if (["cancelled", "interrupted", "failed"].includes(full.status))
      actions.push(el("button", { id: "resume", onclick: () => api(`/api/jobs/${id}/resume`, { method: "POST" }).then(() => { follow(); renderDetails(); }) }, "Resume"));
    const files = el("ul", { id: "downloads" }, ...full.downloads.map((f) => el("li", {}, el("a", { href: `/api/jobs/${id}/files/${f}` }, f))));
    if (full.summary.datasets && Object.keys(full.summary.datasets).length)
      files.prepend(el("li", {}, el("a", { href: `/api/jobs/${id}/datasets.zip` }, "datasets.zip (all datasets)")));
    const summary = el("table", { id: "summary" }, ...Object.entries(full.summary).map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))));
    details.replaceChildren(el("div", {}, ...actions, " ", el("a", { href: `/api/jobs/${id}/log` }, "log")),
      el("h2", {}, "Summary"), summary, el("h2", {}, "Downloads"), files,
      ...(full.summary.report ? [el("h2", {}, "Report"), el("iframe", { id: "report", src: `/api/jobs/${id}/files/report.html` })] : []));
  }
  function follow() {
    stopPage();
    const source = new EventSource(`/api/jobs/${id}/events`);
    source.addEventListener("progress", (e) => render(JSON.parse(e.data)));
    source.addEventListener("end", (e) => { source.close(); render(JSON.parse(e.data)); renderDetails(); });
    stopPage = () => source.close();
  }
  await renderDetails();
  follow();
}

function route() {
  stopPage();
  stopPage = () => {};
  const match = location.hash.match(/^#\/jobs\/(\d+)/);
  (match ? jobPage(match[1]) : listPage()).catch((e) => view.replaceChildren(el("p", { class: "error" }, e.message)));
}
window.addEventListener("hashchange", route);
route();
