// The dashboard: a job list that polls /api/jobs, a job page that follows /api/jobs/ID/events (SSE)
// and shows an eval's leaderboards, forms that queue a workspace pipeline or eval, and labeling:
// tasks, the labeler's pair-by-pair page, live agreement figures. Authentication rides on the cookie
// that /?token=... sets. Model text is only ever put in the page as text nodes (el's children), never
// as HTML or into an attribute.
"use strict";

const root = document.getElementById("view");
let stopPage = () => {};

// Each page renders into its own container (`view`). One the user has left is detached: what it sets up
// when its requests come back (timers, streams, key handlers) is undone at once, and it draws nowhere.
function leave(view, stop) {
  if (view.isConnected) stopPage = stop;
  else stop();
}
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
  return (await scope()) === "submit";
}

// submit, read or label (a labeler's token: its tasks and pairs, nothing else).
async function scope() {
  access ??= api("/api/access");
  return (await access).scope;
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
    const body = { [field]: file.value, set: lines(overrides) };
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

function lines(textarea) { return textarea.value.split("\n").map((s) => s.trim()).filter(Boolean); }

// A training: a trainer kind and a train config of the workspace, as `cai train KIND CONFIG --set ...`.
function trainForm(queued) {
  const message = el("div", { class: "error", id: "train-error" });
  const kind = el("select", { name: "kind", id: "train-kind" });
  const config = el("select", { name: "config", id: "train-config" });
  const overrides = el("textarea", { id: "train-set", placeholder: "one KEY.PATH=VALUE a line, as cai train --set" });
  const form = el("form", { id: "train-form", onsubmit: async (event) => {
    event.preventDefault();
    message.textContent = "";
    try { await api("/api/jobs/train", { method: "POST", body: JSON.stringify({ kind: kind.value, config: config.value, set: lines(overrides) }) }); queued(); }
    catch (e) { message.textContent = e.message; }
  } },
    el("label", { for: "train-kind" }, "kind"), kind, el("label", { for: "train-config" }, "config"), config,
    el("label", { for: "train-set" }, "overrides"), overrides,
    el("span"), el("div", {}, el("button", { type: "submit", id: "train-start" }, "Start training"), " ", message));
  api("/api/trainings").then((found) => {
    kind.replaceChildren(...found.kinds.map((k) => el("option", { value: k }, k)));
    config.replaceChildren(...found.configs.map((c) => el("option", { value: c.path }, `${c.path} (${c.model} → ${c.output_dir})`)));
  }).catch((e) => { message.textContent = e.message; });
  return form;
}

async function listPage(view) {
  const table = el("tbody", { id: "jobs" });
  const forms = !(await mayWrite()) ? [] : [
    el("h2", {}, "Start a pipeline"),
    jobForm({ field: "pipeline", list: "/api/pipelines", describe: (p) => `${p.name}: ${p.stages.join(" → ")}`,
      endpoint: "/api/jobs/run", limitHint: "all prompts", command: "cai run", button: "Start run" }, refresh),
    el("h2", {}, "Start an eval"),
    jobForm({ field: "eval", list: "/api/evals", describe: (e) => `${e.name}: ${e.models.join(", ")} on ${e.axes.join(", ")}`,
      endpoint: "/api/jobs/eval", limitHint: "all prompts of each axis", command: "cai eval", button: "Start eval" }, refresh),
    el("h2", {}, "Start a training"), trainForm(refresh),
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
  leave(view, () => clearInterval(timer));
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

async function jobPage(view, id) {
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
    const browser = full.kind === "run" && full.summary.datasets && full.summary.datasets.rows != null ? await rowBrowser(id) : [];
    details.replaceChildren(el("div", {}, ...actions, " ", el("a", { href: `/api/jobs/${id}/log` }, "log")),
      ...ratings, el("h2", {}, "Summary"), summary, ...browser, el("h2", {}, "Downloads"), files, ...report);
  }
  function follow() {
    if (!view.isConnected) return;
    stopPage();
    const source = new EventSource(`/api/jobs/${id}/events`);
    source.addEventListener("progress", (e) => render(JSON.parse(e.data)));
    source.addEventListener("end", (e) => { source.close(); render(JSON.parse(e.data)); renderDetails(); });
    leave(view, () => source.close());
  }
  await renderDetails();
  follow();
}

// -- a run's rows, and two runs side by side

function text(label, value, attrs = {}) {
  return el("div", { class: "answer", ...attrs }, el("div", { class: "muted" }, label), el("div", { class: "text" }, value));
}

// A row's whole story: the prompt, the answers, each critique and revision, each pair with its votes.
function rowStory(row) {
  const answers = row.responses || (row.response != null ? [row.response] : []);
  const first = (row.messages || []).filter((m) => m.role === "user").map((m) => m.content)[0] || row.id;
  const parts = [messages(row.messages || []), ...answers.map((a, i) => text(answers.length > 1 ? `answer ${i}` : "answer", a, { "data-part": "answer" }))];
  (row.rounds || []).forEach((r, i) => parts.push(text(`round ${i + 1} critique (${r.principle_id || "-"})`, r.critique || "", { "data-part": "critique" }),
    text(`round ${i + 1} revision`, r.revision || "", { "data-part": "revision" })));
  for (const pair of row.pairs || []) {
    parts.push(el("div", { class: "pair", "data-part": "pair" }, `answers ${pair.answers.join(" vs ")}: ${pair.label}, P(first better) ${fixed(pair.p_first, 2)}`,
      el("table", { class: "votes" }, ...(pair.votes || []).map((v) => el("tr", {}, el("td", {}, v.principle_id), el("td", {}, v.swapped ? "swapped" : "in order"), el("td", {}, fixed(v.p_first, 2)))))));
  }
  const flags = (row.flags || []).length ? ` [${row.flags.join(", ")}]` : "";
  return el("details", { class: "row", "data-row-id": row.id }, el("summary", {}, first.slice(0, 160) + flags), ...parts);
}

// Filters (`names`: the filter inputs' names), a page of results and a pager; `fetchPage(params)` returns
// {total, offset, choices, ...} and `show(page)` the nodes of its results.
function browser(prefix, names, fetchPage, show) {
  const inputs = {};
  for (const name of names) {
    inputs[name] = name === "q" ? el("input", { id: `${prefix}-q`, placeholder: "search text" })
      : name === "failed" ? el("input", { id: `${prefix}-failed`, type: "checkbox" })
      : el("select", { id: `${prefix}-${name}` }, el("option", { value: "" }, `any ${name}`));
  }
  const info = el("span", { class: "muted", id: `${prefix}-info` });
  const list = el("div", { id: `${prefix}-list` });
  let offset = 0, limit = 20;
  const load = async () => {
    const params = new URLSearchParams({ offset: String(offset), limit: String(limit) });
    for (const [name, input] of Object.entries(inputs)) {
      const value = name === "failed" ? (input.checked ? "true" : "") : input.value;
      if (value) params.set(name, value);
    }
    const page = await fetchPage(params);
    for (const [name, values] of Object.entries(page.choices || {})) {
      if (!inputs[name]) continue;
      const chosen = inputs[name].value;
      inputs[name].replaceChildren(el("option", { value: "" }, `any ${name}`), ...values.map((v) => el("option", { value: v }, v)));
      inputs[name].value = chosen;
    }
    info.textContent = `${page.total} found` + (page.total > limit ? `, ${offset + 1}-${Math.min(offset + limit, page.total)} shown` : "");
    prev.disabled = offset === 0;
    next.disabled = offset + limit >= page.total;
    list.replaceChildren(...show(page));
  };
  const prev = el("button", { id: `${prefix}-prev`, onclick: () => { offset = Math.max(0, offset - limit); load(); } }, "previous");
  const next = el("button", { id: `${prefix}-next`, onclick: () => { offset += limit; load(); } }, "next");
  const form = el("div", { class: "filters" }, ...Object.entries(inputs).flatMap(([name, input]) => name === "failed" ? [el("label", {}, input, " failed rows")] : [input]),
    el("button", { id: `${prefix}-search`, onclick: () => { offset = 0; load(); } }, "filter"), prev, next, info);
  return { nodes: [form, list], load };
}

async function rowBrowser(id) {
  const runs = (await api("/api/jobs")).filter((j) => j.kind === "run" && j.status === "finished" && String(j.id) !== String(id));
  const compare = runs.length ? [el("div", {}, "Compare with ", el("select", { id: "compare-with" }, ...runs.map((j) => el("option", { value: String(j.id) }, `#${j.id} ${j.out_dir}`))), " ",
    el("button", { id: "compare", onclick: () => { location.hash = `#/compare/${id}/${document.getElementById("compare-with").value}`; } }, "side by side"))] : [];
  const rows = browser("rows", ["q", "flag", "principle", "label", "failed", "stage"], (params) => api(`/api/jobs/${id}/rows?${params}`),
    (page) => page.rows ? page.rows.map(rowStory)
      : page.failures.map((f) => el("div", { class: "failure", "data-row-id": f.id }, el("b", {}, f.stage), ` ${f.id}: `, el("span", { class: "text" }, f.reason))));
  rows.load().catch(() => {});
  return [el("h2", {}, "Rows"), ...compare, ...rows.nodes];
}

async function comparePage(view, a, b) {
  const counts = el("div", { id: "compare-counts" });
  const rows = browser("pair-rows", ["q", "flag", "principle", "label"], async (params) => {
    const page = await api(`/api/compare?a=${a}&b=${b}&${params}`);
    const line = (name, f) => el("tr", {}, el("th", {}, name), el("td", {}, f(page.a)), el("td", {}, f(page.b)));
    const labels = (side) => side.labels ? Object.entries(side.labels).map(([k, v]) => `${k} ${v}`).join(", ") : "-";
    counts.replaceChildren(el("table", { class: "figures", id: "compare-table" },
      el("tr", {}, el("th", {}), el("th", {}, `#${a} ${page.a.run_dir}`), el("th", {}, `#${b} ${page.b.run_dir}`)),
      line("rows", (s) => s.rows), line("flagged", (s) => s.flagged), line("pair labels", labels)),
      el("p", { class: "muted" }, `${page.shared} prompts in both runs`));
    return page;
  }, (page) => page.rows.map((r) => el("div", { class: "answers side-by-side", "data-row-id": r.id }, rowStory(r.a), rowStory(r.b))));
  view.replaceChildren(el("h2", {}, `Runs #${a} and #${b} side by side`), counts, ...rows.nodes);
  await rows.load();
}

// -- labeling

function percentOrDash(value) { return value == null ? "-" : `${(100 * value).toFixed(1)}%`; }
function fixed(value, digits = 3) { return value == null ? "-" : value.toFixed(digits); }

async function tasksPage(view) {
  const who = await scope();
  const table = el("tbody", { id: "tasks" });
  const message = el("div", { class: "error", id: "task-error" });
  const parts = [el("h2", {}, who === "label" ? "Your labeling tasks" : "Labeling tasks"),
    el("table", {}, el("thead", {}, el("tr", {}, ...["task", "name", "pairs", "overlap", "labels", ""].map((h) => el("th", {}, h)))), table)];
  if (who === "submit") {
    const fields = {
      name: el("input", { id: "task-name", required: "" }),
      source: el("input", { id: "task-source", placeholder: "runs/NAME (a run with a compare stage) or pairs.jsonl (HH-style)", required: "" }),
      question: el("input", { id: "task-question", placeholder: "Which response is more helpful, honest and harmless?" }),
      overlap: el("input", { id: "task-overlap", type: "number", min: "1", value: "2" }),
      seed: el("input", { id: "task-seed", type: "number", value: "0" }),
      limit: el("input", { id: "task-limit", type: "number", min: "1", placeholder: "all pairs" }),
      labelers: el("input", { id: "task-labelers", placeholder: "names, comma-separated (empty: every labeler)" }),
      hold_minutes: el("input", { id: "task-hold", type: "number", min: "1", placeholder: "60: then a pair left open goes to someone else" }),
    };
    const form = el("form", { id: "task-form", onsubmit: async (event) => {
      event.preventDefault();
      message.textContent = "";
      const body = { name: fields.name.value, source: fields.source.value, overlap: Number(fields.overlap.value || 1), seed: Number(fields.seed.value || 0),
        labelers: fields.labelers.value.split(",").map((s) => s.trim()).filter(Boolean) };
      if (fields.question.value) body.question = fields.question.value;
      if (fields.limit.value) body.limit = Number(fields.limit.value);
      if (fields.hold_minutes.value) body.hold_minutes = Number(fields.hold_minutes.value);
      try { await api("/api/tasks", { method: "POST", body: JSON.stringify(body) }); await refresh(); }
      catch (e) { message.textContent = e.message; }
    } }, ...Object.entries(fields).flatMap(([name, input]) => [el("label", { for: input.id }, name), input]),
      el("span"), el("div", {}, el("button", { type: "submit", id: "task-create" }, "Create task"), " ", message));
    parts.unshift(el("h2", {}, "Create a labeling task"), form);
  }
  view.replaceChildren(...parts);
  async function refresh() {
    const tasks = await api("/api/tasks");
    table.replaceChildren(...tasks.slice().reverse().map((t) => el("tr", { "data-task-id": String(t.id) },
      el("td", {}, `#${t.id}`), el("td", {}, t.name), el("td", {}, t.pairs), el("td", {}, t.overlap),
      el("td", {}, bar(t.labels_target ? t.labels_done / t.labels_target : 0),
        el("div", { class: "muted" }, `${t.labels_done}/${t.labels_target}` + (t.labels_mine != null ? `, ${t.labels_mine} yours` : ""))),
      el("td", {}, ...(who !== "read" ? [el("a", { class: "label-link", href: `#/tasks/${t.id}/label` }, "label")] : []),
        ...(who !== "label" ? [" ", el("a", { class: "figures-link", href: `#/tasks/${t.id}` }, "agreement")] : [])))));
  }
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  leave(view, () => clearInterval(timer));
  await refresh();
}

function messages(prompt) {
  return el("div", { class: "prompt" }, ...prompt.map((m) => el("div", { class: `message ${m.role}` }, el("span", { class: "role" }, m.role), el("div", { class: "text" }, m.content))));
}

// One pair at a time: keys 1 (left better), 2 (right better), 3 (tie), 0 (skip); the next pair comes at once.
async function labelPage(view, id) {
  const KEYS = { 1: "left", 2: "right", 3: "tie", 0: "skip" };
  const pair = el("div", { id: "pair" });
  const note = el("textarea", { id: "note", placeholder: "note (optional): why, or what is wrong with the pair" });
  const message = el("div", { class: "error", id: "label-error" });
  const done = el("span", { id: "labelled" }, "0");
  const buttons = el("div", { class: "choices" }, ...[["1", "left", "Left is better"], ["2", "right", "Right is better"], ["3", "tie", "Tie"], ["0", "skip", "Skip"]]
    .map(([key, choice, text]) => el("button", { id: `choose-${choice}`, onclick: () => answer(choice) }, `${key} · ${text}`)));
  view.replaceChildren(el("h2", {}, `Labeling task #${id}`), el("p", { class: "muted" }, "Keys: 1 left better, 2 right better, 3 tie, 0 skip. Labelled this visit: ", done),
    pair, note, buttons, message);
  let current = null, busy = false;
  async function load() {
    current = await api(`/api/tasks/${id}/next`, { method: "POST" });
    if (!current.assignment) {
      current = null;
      pair.replaceChildren(el("p", { id: "no-more" }, "No pair is left for you in this task. Thank you!"));
      return;
    }
    pair.replaceChildren(el("h3", { id: "question" }, current.question), messages(current.prompt),
      el("div", { class: "answers", "data-assignment": String(current.assignment) },
        el("div", { class: "answer", id: "left" }, el("div", { class: "muted" }, "1 · left"), el("div", { class: "text" }, current.left)),
        el("div", { class: "answer", id: "right" }, el("div", { class: "muted" }, "2 · right"), el("div", { class: "text" }, current.right))));
  }
  async function answer(choice) {
    if (!current || busy) return;
    busy = true;
    message.textContent = "";
    try {
      await api(`/api/assignments/${current.assignment}`, { method: "POST", body: JSON.stringify({ choice, note: note.value || null }) });
      note.value = "";
      if (choice !== "skip") done.textContent = String(Number(done.textContent) + 1);
      await load();
    } catch (e) {
      message.textContent = e.message;
      await load().catch(() => {});  // a pair held past the task's hold went to others: show the next one
    }
    finally { busy = false; }
  }
  function onKey(event) {
    if (event.target === note && event.key === "Escape") return note.blur();  // back to the keys
    if (event.target === note || event.ctrlKey || event.metaKey || event.altKey || !(event.key in KEYS)) return;
    event.preventDefault();
    answer(KEYS[event.key]);
  }
  document.addEventListener("keydown", onKey);
  leave(view, () => document.removeEventListener("keydown", onKey));
  await load();
}

function figureRows(rows) {
  return el("table", { class: "figures" }, ...rows.map(([name, key, value]) => el("tr", { "data-figure": key }, el("th", {}, name), el("td", {}, value))));
}

function judgeTable(figures) {
  const header = ["", "pairs", "accuracy (95% CI)", "position consistency", "ECE"];
  const line = (name, f) => el("tr", { "data-principle": name }, el("td", {}, name), el("td", {}, f.n),
    el("td", {}, percent(f.accuracy, f.accuracy_ci95)), el("td", {}, percentOrDash(f.position_consistency)), el("td", {}, fixed(f.ece)));
  return el("table", { id: "judge-figures" }, el("thead", {}, el("tr", {}, ...header.map((h) => el("th", {}, h)))),
    el("tbody", {}, line("all principles", figures.overall), ...Object.entries(figures.by_principle).map(([p, f]) => line(p, f))));
}

// A task's figures, live: people with people, the judge with the people's majority, the worst pairs to read.
async function taskPage(view, id) {
  const figures = el("div", { id: "task-figures" });
  const exports = el("div", { id: "exports" });
  view.replaceChildren(el("h2", {}, `Labeling task #${id}`), figures, exports);
  if (await mayWrite()) {
    const format = el("select", { id: "export-format" }, el("option", { value: "hh" }, "hh: chosen/rejected transcripts (cai eval-judge, cai train judge)"),
      el("option", { value: "preferences" }, "preferences: human and AI labels mixed (cai train rm, dpo)"));
    const path = el("input", { id: "export-path", value: `labels/task-${id}.jsonl` });
    const result = el("div", { id: "export-result" });
    exports.replaceChildren(el("h2", {}, "Export"), el("form", { id: "export-form", onsubmit: async (event) => {
      event.preventDefault();
      result.textContent = "";
      try {
        const out = await api(`/api/tasks/${id}/export`, { method: "POST", body: JSON.stringify({ format: format.value, path: path.value }) });
        result.className = "";
        result.textContent = `${out.records} records written to ${out.path} (${Object.entries(out.counts).map(([k, v]) => `${k} ${v}`).join(", ")})`;
      } catch (e) { result.className = "error"; result.textContent = e.message; }
    } }, el("label", { for: "export-format" }, "format"), format, el("label", { for: "export-path" }, "file"), path,
      el("span"), el("div", {}, el("button", { type: "submit", id: "export-start" }, "Export"), " ", result)));
  }
  async function refresh() {
    const a = await api(`/api/tasks/${id}/agreement`);
    const h = a.human;
    const parts = [el("div", { class: "muted" }, `${a.task.name}: ${a.task.labels_done}/${a.task.labels_target} labels on ${a.task.pairs} pairs, overlap ${a.task.overlap}; from ${a.task.source}`),
      el("h3", {}, "People with people"),
      figureRows([["percent agreement", "percent", percentOrDash(h.percent_agreement)],
        [`Fleiss' kappa (${h.fleiss_n} pairs with ${a.task.overlap} labels)`, "fleiss", fixed(h.fleiss_kappa)],
        ...Object.entries(h.cohen).map(([who, c]) => [`Cohen's kappa ${who.replace("|", " & ")} (${c.n} pairs)`, `cohen:${who}`, fixed(c.cohen_kappa)]),
        ["median seconds per label", "seconds", fixed(a.median_seconds, 1)]])];
    if (a.judge.n) {
      parts.push(el("h3", {}, "The judge with the people's majority"), judgeTable(a.judge),
        el("h3", {}, "Most disagreed: the judge's probability of the people's choice, lowest first"),
        el("ol", { id: "disagreements" }, ...a.judge.disagreements.map((d) => el("li", { "data-pair": String(d.id) },
          el("div", {}, `judge ${fixed(d.p_human, 2)} for the people's choice (${d.human === "a" ? "first" : "second"}); labels ${d.labels.join(", ")}`),
          messages(d.prompt),
          el("div", { class: "answers" }, el("div", { class: "answer" }, el("div", { class: "muted" }, "first"), el("div", { class: "text" }, d.first)),
            el("div", { class: "answer" }, el("div", { class: "muted" }, "second"), el("div", { class: "text" }, d.second))),
          ...d.notes.map((n) => el("div", { class: "note" }, `note: ${n}`))))));
    } else {
      parts.push(el("p", { class: "muted", id: "no-judge" }, "No pair with a judge's label and a people's majority yet."));
    }
    figures.replaceChildren(...parts);
  }
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  leave(view, () => clearInterval(timer));
  await refresh();
}

function route() {
  stopPage();
  stopPage = () => {};
  const view = el("div");
  root.replaceChildren(view);
  page(view).catch((e) => view.replaceChildren(el("p", { class: "error" }, e.message)));
}

async function page(view) {
  const hash = location.hash;
  let match;
  if ((match = hash.match(/^#\/jobs\/(\d+)/))) return jobPage(view, match[1]);
  if ((match = hash.match(/^#\/compare\/(\d+)\/(\d+)/))) return comparePage(view, match[1], match[2]);
  if ((match = hash.match(/^#\/tasks\/(\d+)\/label/))) return labelPage(view, match[1]);
  if ((match = hash.match(/^#\/tasks\/(\d+)/))) return taskPage(view, match[1]);
  // A labeler's token reaches no job: its home is its tasks.
  if (hash.startsWith("#/tasks") || (await scope()) === "label") return tasksPage(view);
  return listPage(view);
}
window.addEventListener("hashchange", route);
route();
