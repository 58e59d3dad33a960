// The dashboard: a job list that polls /api/jobs, a job page that follows /api/jobs/ID/events (SSE)
// and shows an eval's leaderboards, and forms that queue a workspace pipeline or eval. Authentication
// rides on the cookie that /?token=... sets.
"use strict";

const view = document.getElementById("view");
let stopPage = () => {};
let access = null;  // the promise of /api/access: asked once per page load

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

// Whether this token may start, cancel and resume jobs: a read-only one is shown no controls it would be refused.
async function mayWrite() {
  access ??= api("/api/access");
  return !(await access).read_only;
}

function rates(p, kind) {
  // An eval answers, then judges: each phase's count says where it is (a run's rows go through every stage at once).
  if (kind === "eval" && p.stages) return `${Object.entries(p.stages).map(([name, s]) => `${name} ${s.done}/${s.total}`).join(", ")}, ${p.tokens_per_s} tok/s, ${p.failures} failed`;
  if (p.rows_total != null) return `${p.stage || ""} ${p.rows_done}/${p.rows_total} rows, ${p.rows_per_s} rows/s, ${p.tokens_per_s} tok/s, ${p.failures} failed`;
  if (p.step != null) return `step ${p.step}${p.max_steps ? "/" + p.max_steps : ""}${p.loss != null ? ", loss " + p.loss.toFixed(4) : ""}`;
  return "";
}

// -- the job list and the forms

// A form that queues a job on a workspace file (`field`: the request's file field, and the ids' prefix):
// the file picked from `list`, a prompt limit and --set overrides, as on the command line.
function jobForm({ field, list, describe, endpoint, limitHint, command, button }, queued) {
  const message = el("div", { class: "error", id: `${field}-error` });
  const file = el("select", { name: field, id: field });
  const limit = el("input", { name: "limit", id: `${field}-limit`, type: "number", min: "1", placeholder: limitHint });
  const overrides = el("textarea", { name: "set", id: `${field}-set`, placeholder: `one KEY.PATH=VALUE a line, as ${command} --set` });
  const form = el("form", { id: `${field}-form`, onsubmit: async (event) => {
    event.preventDefault();
    message.textContent = "";
    const body = { [field]: file.value, set: overrides.value.split("\n").map((s) => s.trim()).filter(Boolean) };
    if (limit.value) body.limit = Number(limit.value);
    try { await api(endpoint, { method: "POST", body: JSON.stringify(body) }); queued(); }
    catch (e) { message.textContent = e.message; }
  } },
    el("label", { for: field }, field), file,
    el("label", { for: `${field}-limit` }, "limit"), limit,
    el("label", { for: `${field}-set` }, "overrides"), overrides,
    el("span"), el("div", {}, el("button", { type: "submit", id: `${field}-start` }, button), " ", message));
  api(list).then((found) => {
    file.replaceChildren(...found.map((f) => el("option", { value: f.path }, `${f.path} (${describe(f)})`)));
  }).catch((e) => { message.textContent = e.message; });
  return form;
}

async function listPage() {
  const table = el("tbody", { id: "jobs" });
  const forms = !(await mayWrite()) ? [] : [
    el("h2", {}, "Start a pipeline"),
    jobForm({ field: "pipeline", list: "/api/pipelines", describe: (p) => `${p.name}: ${p.stages.join(" → ")}`,
      endpoint: "/api/jobs/run", limitHint: "all prompts", command: "cai run", button: "Start run" }, refresh),
    el("h2", {}, "Start an eval"),
    jobForm({ field: "eval", list: "/api/evals", describe: (e) => `${e.name}: ${e.models.join(", ")} on ${e.axes.join(", ")}`,
      endpoint: "/api/jobs/eval", limitHint: "all prompts of each axis", command: "cai eval", button: "Start eval" }, refresh),
  ];
  view.replaceChildren(...forms,
    el("h2", {}, "Jobs"),
    el("table", {}, el("thead", {}, el("tr", {}, ...["job", "status", "kind", "file", "output", "progress", ""].map((h) => el("th", {}, h)))), table));

  async function refresh() {
    const jobs = await api("/api/jobs");
    table.replaceChildren(...jobs.slice().reverse().map((job) => el("tr", { "data-job-id": String(job.id), "data-status": job.status },
      el("td", {}, el("a", { href: `#/jobs/${job.id}` }, `#${job.id}`)),
      el("td", { class: `status ${job.status}` }, job.status),
      el("td", {}, job.kind), el("td", {}, job.target), el("td", {}, job.out_dir),
      el("td", {}, bar(job.progress.fraction), el("div", { class: "muted" }, rates(job.progress, job.kind))),
      el("td", {}, job.error ? el("span", { class: "error" }, job.error) : ""))));
  }
  const timer = setInterval(() => refresh().catch(() => {}), 1000);
  stopPage = () => clearInterval(timer);
  await refresh();
}

// -- one job

function percent(value, interval) {
  if (value == null) return "-";
  return `${(100 * value).toFixed(1)}%` + (interval ? ` (${(100 * interval[0]).toFixed(1)}-${(100 * interval[1]).toFixed(1)})` : "");
}

// An eval's ratings.json (its contract: cai/rating/results.py): the frontier plot, then a leaderboard per axis, best first.
function leaderboards(id, ratings, downloads) {
  const parts = [el("h2", {}, "Ratings"),
    el("p", {}, `Elo with ${ratings.baseline} at 1000, 95% intervals; the `, el("a", { id: "eval-report", href: `/api/jobs/${id}/files/report.html` }, "report"), " has sample comparisons.")];
  if (downloads.includes("report/frontier.png"))
    parts.push(el("img", { id: "frontier", class: "plot", src: `/api/jobs/${id}/files/report/frontier.png`, alt: "frontier" }));
  const header = ["model", "Elo (95% CI)", `win rate vs ${ratings.baseline} (95% CI)`, "length-controlled win rate", "refusal rate"];
  for (const [axis, figures] of Object.entries(ratings.axes)) {
    const ranked = Object.entries(figures.models).sort(([, a], [, b]) => (b.elo ?? -Infinity) - (a.elo ?? -Infinity));
    parts.push(el("h3", {}, `${axis}: ${figures.n_comparisons} comparisons on ${figures.n_prompts} prompts`),
      el("table", { class: "leaderboard", "data-axis": axis },
        el("thead", {}, el("tr", {}, ...header.map((h) => el("th", {}, h)))),
        el("tbody", {}, ...ranked.map(([name, f]) => el("tr", { "data-model": name },
          el("td", {}, name === ratings.baseline ? `${name} (baseline)` : name),
          el("td", {}, f.elo == null ? "-" : `${f.elo.toFixed(0)} (${f.ci95[0].toFixed(0)}-${f.ci95[1].toFixed(0)})`),
          el("td", {}, percent(f.win_rate_vs_baseline, f.win_rate_ci95)),
          el("td", {}, percent(f.lc_win_rate_vs_baseline)),
          el("td", {}, percent(f.refusal_rate)))))));
  }
  return parts;
}

async function jobPage(id) {
  const job = await api(`/api/jobs/${id}`);
  const progress = el("div", { id: "job-progress" });
  const status = el("span", { id: "job-status" });
  const details = el("div", { id: "job-details" });
  view.replaceChildren(el("h2", {}, `Job #${job.id}: `, status), el("div", { class: "muted" }, job.command.join(" ")), progress, details);

  async function render(event) {
    status.className = `status ${event.status}`;
    status.textContent = event.status;
    progress.replaceChildren(bar(event.fraction), el("div", { class: "muted" }, rates(event, job.kind)),
      event.error ? el("div", { class: "error" }, event.error) : "");
  }
  async function renderDetails() {
    const full = await api(`/api/jobs/${id}`);
    const writer = await mayWrite();
    const actions = [];
    if (writer && ["queued", "running"].includes(full.status))
      actions.push(el("button", { id: "cancel", onclick: () => api(`/api/jobs/${id}/cancel`, { method: "POST" }).then(renderDetails) }, "Cancel"));
    if (writer && ["cancelled", "interrupted", "failed"].includes(full.status))
      actions.push(el("button", { id: "resume", onclick: () => api(`/api/jobs/${id}/resume`, { method: "POST" }).then(() => { follow(); renderDetails(); }) }, "Resume"));
    const files = el("ul", { id: "downloads" }, ...full.downloads.map((f) => el("li", {}, el("a", { href: `/api/jobs/${id}/files/${f}` }, f))));
    if (full.summary.datasets && Object.keys(full.summary.datasets).length)
      files.prepend(el("li", {}, el("a", { href: `/api/jobs/${id}/datasets.zip` }, "datasets.zip (all datasets)")));
    const summary = el("table", { id: "summary" }, ...Object.entries(full.summary).map(([k, v]) =>
      el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))));
    // An eval's leaderboards first, its report (the same, with sample comparisons) a link away; a run's report in the page.
    const ratings = full.kind === "eval" && full.ratings ? leaderboards(id, full.ratings, full.downloads) : [];
    const report = full.kind !== "eval" && full.summary.report
      ? [el("h2", {}, "Report"), el("iframe", { id: "report", src: `/api/jobs/${id}/files/report.html` })] : [];
    details.replaceChildren(el("div", {}, ...actions, " ", el("a", { href: `/api/jobs/${id}/log` }, "log")),
      ...ratings, el("h2", {}, "Summary"), summary, el("h2", {}, "Downloads"), files, ...report);
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
