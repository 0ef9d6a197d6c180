// fasttune studio: the page. Every field comes from /api/schema (the recipe schema); every action is an API call.
"use strict";

const CSRF = document.querySelector('meta[name="csrf"]').content;
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

const STUDIO_SETS = ["run.runs_root", "run.output_dir"];
const state = { schema: null, recipe: {}, fields: {}, previewStart: 0, run: null, rows: [], source: null,
  chat: [], runs: [] };

// ---- the API ---------------------------------------------------------------------------------------------------
async function api(path, body, raw) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "X-Fasttune-Csrf": CSRF, "Content-Type": raw ? "application/octet-stream" :
      "application/json" }, body: raw ? body : JSON.stringify(body) };
  const res = await fetch(path, opts);
  const data = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) { const err = new Error(data.error || res.statusText); err.data = data; err.status = res.status; throw err; }
  return data;
}

function setMessage(id, text, error) {
  const node = $(id); node.textContent = text || ""; node.classList.toggle("error", !!error);
}

// ---- the recipe object and its inputs ----------------------------------------------------------------------------
function getPath(path) { const [s, f] = path.split("."); return state.recipe[s][f]; }
function setPath(path, value) { const [s, f] = path.split("."); state.recipe[s][f] = value; syncInputs(path); }

function parseValue(field, input) {
  if (field.kind === "bool") return input.checked;
  if (field.kind === "list") return input.value.split(",").map((v) => v.trim()).filter(Boolean);
  const text = input.value;
  if (field.kind === "int") return text.trim() === "" ? text : Number(text);
  if (field.kind === "float") return text.trim() === "" ? text : Number(text);
  if (field.kind === "choice") {
    const found = field.allowed.find((a) => String(a) === text);
    return found === undefined ? text : found;
  }
  return text;
}

function inputFor(field) {
  let input;
  if (field.kind === "choice" || field.kind === "template") {
    const options = field.kind === "template" ? ["auto", ...state.schema.templates] : field.allowed;
    input = el("select");
    for (const o of options) input.append(el("option", { value: String(o), text: String(o) }));
  } else if (field.kind === "bool") {
    input = el("input", { type: "checkbox" });
  } else {
    input = el("input", { type: field.kind === "int" || field.kind === "float" ? "number" : "text" });
    if (field.kind === "float") input.step = "any";
  }
  input.dataset.path = field.path;
  input.title = `${field.help} [${field.allowed_text}]`;
  return input;
}

function bind(input) {
  const field = state.fields[input.dataset.path];
  const handler = () => { const [s, f] = field.path.split("."); state.recipe[s][f] = parseValue(field, input);
    syncInputs(field.path, input); onRecipeChange(field.path); };
  input.addEventListener("change", handler);
  if (input.type === "text" || input.type === "number") input.addEventListener("input", handler);
}

function syncInputs(path, except) {
  for (const input of document.querySelectorAll(`[data-path="${path}"]`)) {
    if (input === except) continue;
    const value = getPath(path);
    if (input.type === "checkbox") input.checked = !!value;
    else input.value = Array.isArray(value) ? value.join(", ") : String(value);
  }
}

function fieldLabel(path, short) {
  const field = state.fields[path];
  const input = inputFor(field);
  bind(input);
  const label = el("label", { class: field.kind === "bool" ? "check" : "" });
  if (field.kind === "bool") label.append(input, short || field.name);
  else label.append(short || field.name, input);
  label.append(el("span", { class: "field-problem", "data-problem": path }));
  return label;
}

function buildForm() {
  const form = $("recipe-form");
  for (const section of state.schema.sections) {
    const set = el("fieldset", {}, el("legend", { text: `${section.name}: ${section.doc}` }));
    const row = el("div", { class: "row" });
    for (const field of section.fields) {
      if (STUDIO_SETS.includes(field.path)) continue;  // the studio puts every run under its runs folder
      row.append(fieldLabel(field.path));
    }
    set.append(row);
    form.append(set);
  }
  for (const p of ["model.quantization", "model.max_seq_length", "train.batch_size", "lora.r",
    "train.gradient_checkpointing"]) $("model-settings").append(fieldLabel(p));
  for (const p of ["data.format", "data.chat_template", "data.responses_only", "data.text_field", "data.max_rows"])
    $("data-settings").append(fieldLabel(p));
  for (const p of ["train.method", "train.max_steps", "train.learning_rate", "train.batch_size",
    "train.gradient_accumulation_steps", "run.name"]) $("method-row").append(fieldLabel(p));
  for (const [name, help] of Object.entries(state.schema.rewards)) {
    const box = el("input", { type: "checkbox", value: name });
    box.addEventListener("change", () => {
      const chosen = [...document.querySelectorAll("#reward-list input:checked")].map((b) => b.value);
      setPath("rl.rewards", chosen); onRecipeChange("rl.rewards");
    });
    $("reward-list").append(el("label", { class: "check", title: help }, box, `${name}: ${help}`));
  }
  const more = el("div", { class: "row" });
  for (const p of ["rl.reward_functions", "rl.answer_field", "rl.format_regex", "rl.numeric_tolerance",
    "rl.target_length", "rl.num_generations", "rl.max_completion_length", "rl.beta"]) more.append(fieldLabel(p));
  $("rewards").append(more);
  for (const id of ["model-name", "data-path", "reward-file"]) bind($(id));
  for (const f of Object.keys(state.fields)) syncInputs(f);
}

let validateTimer = null;
function onRecipeChange(path) {
  if (path === "train.method") $("rewards").classList.toggle("hidden", getPath("train.method") !== "grpo");
  clearTimeout(validateTimer);
  validateTimer = setTimeout(validate, 250);
}

async function validate() {
  const { problems } = await api("/api/validate", { recipe: state.recipe });
  showProblems(problems);
  return problems;
}

function showProblems(problems) {
  for (const node of document.querySelectorAll("[data-problem]")) node.textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
  for (const p of problems) {
    for (const node of document.querySelectorAll(`[data-problem="${p.field}"]`)) node.textContent = p.problem;
    for (const node of document.querySelectorAll(`[data-path="${p.field}"]`)) node.classList.add("invalid");
  }
  const box = $("train-problems");
  box.classList.toggle("hidden", !problems.length);
  box.replaceChildren(el("strong", { text: `${problems.length} problem(s) in the recipe:` }),
    el("ul", {}, ...problems.map((p) => el("li", { text: p.problem }))));
}

// ---- tabs ----------------------------------------------------------------------------------------------------
function showPage(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.page === name);
  for (const p of document.querySelectorAll(".page")) p.classList.toggle("hidden", p.id !== `page-${name}`);
  if (name === "runs" || name === "chat" || name === "export") refreshRuns();
  if (name === "export") refreshExport();
}

// ---- model page ------------------------------------------------------------------------------------------------
function modelKindChanged() {
  const kind = $("model-kind").value;
  $("model-real-wrap").classList.toggle("hidden", kind !== "real");
  $("model-name-wrap").classList.toggle("hidden", kind === "tiny" || kind === "real");
  $("model-browse").classList.toggle("hidden", kind !== "local");
  if (kind === "tiny") setPath("model.name", state.schema.tiny_models[0]);
  if (kind === "real") setPath("model.name", $("model-real").value);
  onRecipeChange("model.name");
}

const MiB = (b) => `${(b / 2 ** 20).toFixed(0)} MiB`;
const GiB = (b) => b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : MiB(b);
const bytes = (b) => b >= 2 ** 30 ? GiB(b) : b >= 2 ** 20 ? `${(b / 2 ** 20).toFixed(1)} MiB` :
  b >= 1024 ? `${(b / 1024).toFixed(1)} KiB` : `${b} B`;
const human = (n) => n >= 1e9 ? `${(n / 1e9).toFixed(2)} B` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} M` :
  n >= 1e3 ? `${(n / 1e3).toFixed(1)} K` : String(n);

async function checkModel() {
  const box = $("model-info");
  box.classList.remove("hidden");
  box.replaceChildren(el("p", { class: "muted", text: "reading the model's config…" }));
  try {
    const info = await api("/api/model", { recipe: state.recipe });
    const e = info.estimate;
    const fact = (v, k) => el("div", { class: "fact" }, el("b", { text: v }), el("span", { text: k }));
    const phase = e.phases[e.peak_phase];
    const colors = ["#2f6fec", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#84cc16", "#ec4899", "#64748b"];
    const parts = [["runtime (measured)", e.baseline], ...Object.entries(phase)].filter(([, v]) => v > 0);
    const bars = el("div", { class: "bars" });
    const legend = el("div", { class: "row" });
    parts.forEach(([name, v], i) => {
      const d = el("div", { title: `${name}: ${MiB(v)}` });
      d.style.width = `${(100 * v) / e.total}%`; d.style.background = colors[i % colors.length];
      bars.append(d);
      const sw = el("span", { text: "■ " }); sw.style.color = colors[i % colors.length];
      legend.append(el("span", { class: "muted" }, sw, `${name} ${MiB(v)}`));
    });
    box.replaceChildren(el("h3", { text: info.name }),
      el("div", { class: "facts" }, fact(info.family || info.model_type, info.fast_path ? "family (fast path)" :
        "model type (no fast path: plain transformers)"), fact(human(info.parameters), "parameters"),
      fact(String(info.layers), "layers"), fact(String(info.hidden), "hidden size"), fact(human(info.vocab), "vocabulary"),
      fact(GiB(e.total), e.on_cpu ? "predicted peak (process RSS)" : "predicted peak (GPU)")),
      el("p", { class: "muted", text: `peak phase: ${e.peak_phase}; ${getPath("model.quantization")}, batch ` +
        `${getPath("train.batch_size")} × ${getPath("model.max_seq_length")} tokens` }), bars, legend,
      ...(info.estimate_note ? [el("p", { class: "warn", text: info.estimate_note })] : []));
  } catch (err) {
    box.replaceChildren(el("div", { class: "problems" }, el("p", { text: err.message })));
  }
}

// ---- file picker ---------------------------------------------------------------------------------------------
async function pick(path, target) {
  $("picker").classList.remove("hidden");
  const listing = await api(`/api/files${path ? `?path=${encodeURIComponent(path)}` : ""}`);
  $("picker-path").textContent = listing.path || "allowed folders";
  const list = $("picker-list");
  list.replaceChildren();
  if (listing.parent || listing.path) list.append(el("li", { text: "⬑ ..", onclick: () => pick(listing.parent, target) }));
  for (const e of listing.entries) {
    const li = el("li", { text: `${e.dir ? "📁" : "📄"} ${e.name}${e.model ? "  (model folder)" : ""}` });
    li.addEventListener("click", () => {
      if (e.dir && !e.model) pick(e.path, target);
      else { setPath(target, e.path); onRecipeChange(target); $("picker").classList.add("hidden"); }
    });
    if (e.dir) li.append(el("button", { class: "secondary", text: "use this folder", onclick: (ev) => {
      ev.stopPropagation(); setPath(target, e.path); onRecipeChange(target); $("picker").classList.add("hidden"); } }));
    list.append(li);
  }
}

// ---- data page -----------------------------------------------------------------------------------------------
async function upload() {
  const file = $("data-file").files[0];
  if (!file) return;
  const res = await api(`/api/upload?name=${encodeURIComponent(file.name)}`, await file.arrayBuffer(), true);
  setPath("data.path", res.path);
  onRecipeChange("data.path");
  state.previewStart = 0;
  await previewData();
}

async function previewData() {
  const summary = $("data-summary"), rowsBox = $("data-rows"), problemsBox = $("data-problems");
  summary.classList.remove("hidden");
  summary.replaceChildren(el("p", { class: "muted", text: "tokenizing and masking as the trainer does…" }));
  rowsBox.replaceChildren(); problemsBox.classList.add("hidden");
  try {
    const out = await api("/api/preview", { recipe: state.recipe, start: state.previewStart, count: 6 });
    const ratio = out.total_tokens ? ` — ${out.trained_tokens} of ${out.total_tokens} tokens trained in these rows` : "";
    summary.replaceChildren(el("div", { class: "facts" },
      el("div", { class: "fact" }, el("b", { text: out.format }), el("span", { text: "format (detected)" })),
      el("div", { class: "fact" }, el("b", { text: String(out.total_rows) }), el("span", { text: "rows" })),
      el("div", { class: "fact" }, el("b", { text: String(out.problems.length) }), el("span", { text: "problems" })),
      el("div", { class: "fact" }, el("b", { text: out.method }), el("span", { text: "method" }))),
    el("p", {}, "Trained: ", el("mark", { class: "trained", text: out.trained }), ratio),
    el("p", { class: "muted", text: `columns: ${out.columns.join(", ")}` }));
    if (out.problems.length) {
      problemsBox.classList.remove("hidden");
      problemsBox.replaceChildren(el("strong", { text: `The dataset checks found ${out.problems.length} problem(s):` }),
        el("ul", {}, ...out.problems.slice(0, 100).map((p) => el("li", { text: `row ${p.row}: ${p.problem}` }))));
    }
    for (const row of out.rows) {
      const head = el("div", { class: "head" }, el("span", { text: `row ${row.index}` }));
      const box = el("div", { class: "datarow" }, head);
      if (row.tokens) {
        head.append(el("span", { class: row.problem ? "bad" : "", text: row.problem ||
          `${row.trained_tokens} / ${row.total_tokens} tokens trained` }));
        const pre = el("pre");
        for (const [text, trained] of row.tokens) pre.append(el("span", { class: trained ? "tok trained" : "tok", text }));
        box.append(pre);
      } else {
        for (const part of row.parts) box.append(el("div", { class: "part" }, el("b", { text: part.column +
          (part.trained ? " (trained)" : "") }), el(part.trained ? "mark" : "span", { class: part.trained ? "trained" : "",
          text: part.text })));
      }
      rowsBox.append(box);
    }
    $("data-pager").classList.remove("hidden");
    $("data-range").textContent = `rows ${out.start}–${out.start + out.rows.length - 1} of ${out.total_rows}`;
    $("data-prev").disabled = out.start === 0;
    $("data-next").disabled = out.start + out.rows.length >= out.total_rows;
  } catch (err) {
    const lines = err.data && err.data.problems ? err.data.problems.map((p) => p.problem) : [err.message];
    summary.replaceChildren(el("div", { class: "problems" }, el("ul", {}, ...lines.map((l) => el("li", { text: l })))));
  }
}

// ---- charts (canvas, drawn here) ------------------------------------------------------------------------------
const PALETTE = ["#2f6fec", "#ef4444", "#10b981", "#f59e0b", "#8b5cf6", "#06b6d4", "#ec4899", "#64748b"];

function drawChart(canvas, title, series, format, legend) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif"; g.fillStyle = "#1d2330"; g.fillText(title, 8, 14);
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) { g.fillStyle = "#6b7385"; g.fillText("waiting for the first logged step…", 8, h / 2); return; }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const keyed = series.length > 1 || legend;  // a legend row per series, above the plot
  const L = 58, R = 10, T = 24 + (keyed ? 14 * series.length : 0), B = 22;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (w - L - R), sy = (y) => h - B - ((y - y0) / (y1 - y0)) * (h - T - B);
  g.strokeStyle = "#e5e7eb"; g.fillStyle = "#6b7385"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    g.beginPath(); g.moveTo(L, sy(y)); g.lineTo(w - R, sy(y)); g.stroke();
    g.fillText((format || fmt)(y), 4, sy(y) + 4);
  }
  g.fillText(String(Math.round(x0)), L, h - 6);
  g.fillText(`step ${Math.round(x1)}`, w - R - 50, h - 6);
  series.forEach((s, i) => {
    g.strokeStyle = s.color || PALETTE[i % PALETTE.length]; g.fillStyle = g.strokeStyle; g.lineWidth = 2;
    g.beginPath();
    s.points.forEach(([x, y], j) => (j ? g.lineTo(sx(x), sy(y)) : g.moveTo(sx(x), sy(y))));
    g.stroke();
    for (const [x, y] of s.points.length < 40 ? s.points : []) { g.beginPath(); g.arc(sx(x), sy(y), 2.5, 0, 7); g.fill(); }
  });
  if (!keyed) return;
  series.forEach((s, i) => {
    const width = g.measureText(`— ${s.label}`).width;
    g.fillStyle = s.color || PALETTE[i % PALETTE.length]; g.fillText(`— ${s.label}`, w - R - width, 28 + 14 * i);
  });
}
const fmt = (v) => Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : Math.abs(v) >= 0.01 ?
  v.toFixed(3) : v.toExponential(1);

function chartSpecs(rows) {
  const keys = new Set(rows.flatMap((r) => Object.keys(r)));
  const specs = [["loss", ["loss", "eval_loss"]], ["learning rate", ["learning_rate"]], ["grad norm", ["grad_norm"]],
    ["tokens / s", ["tokens_per_s"]], ["memory (MiB)", ["rss_bytes", "device_bytes"], (v) => v / 2 ** 20]];
  const rewards = [...keys].filter((k) => /^rewards\/.+\/mean$/.test(k));
  if (rewards.length) specs.push(["reward per function", rewards]);
  if (keys.has("reward")) specs.push(["reward (total)", ["reward"]]);
  if (keys.has("kl")) specs.push(["KL to the base model", ["kl"]]);
  if (keys.has("rewards/margins")) specs.push(["preference margin", ["rewards/margins"]]);
  return specs.filter(([, ks]) => ks.some((k) => keys.has(k)));
}

function renderCharts(rows) {
  const box = $("charts");
  for (const [title, keys, scale] of chartSpecs(rows)) {
    let canvas = box.querySelector(`canvas[data-title="${title}"]`);
    if (!canvas) {
      canvas = el("canvas", { "data-title": title });
      box.append(el("div", { class: "chart" }, canvas));
    }
    const series = keys.map((k) => ({ label: k.replace(/^rewards\//, "").replace(/\/mean$/, ""),
      points: rows.filter((r) => typeof r[k] === "number").map((r) => [r.step, scale ? scale(r[k]) : r[k]]) }))
      .filter((s) => s.points.length);
    drawChart(canvas, title, series);
  }
}

// ---- training ------------------------------------------------------------------------------------------------
async function startTraining() {
  setMessage("train-message", "");
  const problems = await validate();
  if (problems.length) { setMessage("train-message", "fix the problems above first", true); return; }
  try {
    const res = await api("/api/runs", { recipe: state.recipe });
    attach(res.name);
    setMessage("train-message", `started ${res.name}`);
  } catch (err) {
    setMessage("train-message", err.message, true);
    if (err.data && err.data.problems) showProblems(err.data.problems);
  }
}

function attach(name) {
  if (state.source) state.source.close();
  state.run = name; state.rows = [];
  $("live").classList.remove("hidden");
  $("live-name").textContent = name;
  $("live-status").textContent = "starting"; $("live-status").className = "pill starting";
  $("live-log").textContent = "";
  $("charts").replaceChildren();
  $("train-stop").disabled = false;
  $("train-resume").classList.add("hidden");
  const source = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  state.source = source;
  source.addEventListener("reset", () => { state.rows = []; });
  source.addEventListener("metrics", (e) => { state.rows.push(...JSON.parse(e.data)); renderCharts(state.rows);
    progress(); });
  source.addEventListener("log", (e) => { const log = $("live-log"); log.textContent += JSON.parse(e.data);
    log.scrollTop = log.scrollHeight; progress(); });
  source.addEventListener("status", (e) => { const s = JSON.parse(e.data); const pill = $("live-status");
    pill.textContent = s; pill.className = `pill ${s}`; busy(s === "running" || s === "starting" ? name : null); });
  source.addEventListener("end", (e) => { source.close(); const s = JSON.parse(e.data);
    $("train-stop").disabled = true; busy(null);
    $("train-resume").classList.toggle("hidden", s !== "stopped" && s !== "failed"); progress(true); refreshRuns(); });
}

function progress(done) {
  const log = $("live-log").textContent;
  const m = [...log.matchAll(/step (\d+)\/(\d+)/g)].pop();
  const last = state.rows[state.rows.length - 1];
  const step = last ? last.step : m ? Number(m[1]) : 0;
  const total = m ? Number(m[2]) : getPath("train.max_steps");
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  $("live-bar").style.width = `${pct}%`;
  let eta = "";
  if (last && last.elapsed_s && step && total && !done) {
    const per = last.elapsed_s / Math.max(1, step - (state.rows[0].step - 1));
    eta = ` — about ${Math.max(0, Math.round(per * (total - step)))} s left`;
  }
  $("live-eta").textContent = `step ${step} / ${total || "?"}${eta}`;
}

function busy(name) {
  $("busy").classList.toggle("hidden", !name);
  $("busy").textContent = name ? `training: ${name}` : "";
}

async function stopTraining() {
  try { await api(`/api/runs/${encodeURIComponent(state.run)}/stop`, {});
    setMessage("train-message", "stopping: a checkpoint is saved after this step"); }
  catch (err) { setMessage("train-message", err.message, true); }
}

async function resumeRun(name) {
  try { await api(`/api/runs/${encodeURIComponent(name)}/resume`, {}); showPage("train"); attach(name); }
  catch (err) { setMessage("train-message", err.message, true); showPage("train"); }
}

// ---- runs page -----------------------------------------------------------------------------------------------
const overlayRuns = new Set();
const runMetrics = {};

async function refreshRuns() {
  const { runs, running } = await api("/api/runs");
  state.runs = runs;
  busy(running ? running.name : null);
  const body = $("runs-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of runs) {
    const box = el("input", { type: "checkbox" });
    box.checked = overlayRuns.has(r.name);
    box.addEventListener("change", () => { box.checked ? overlayRuns.add(r.name) : overlayRuns.delete(r.name); drawOverlay(); });
    const actions = el("td", {},
      el("button", { class: "secondary", text: "report", onclick: () => showReport(r.name) }),
      el("a", { href: `/api/runs/${encodeURIComponent(r.name)}/recipe`, text: "recipe.yaml", download: `${r.name}.yaml` }));
    if (r.status === "running" || r.status === "starting") actions.prepend(el("button", { class: "secondary",
      text: "watch", onclick: () => { showPage("train"); attach(r.name); } }));
    if (r.status === "stopped" || r.status === "failed") actions.prepend(el("button", { class: "secondary",
      text: "resume", onclick: () => resumeRun(r.name) }));
    body.append(el("tr", {}, el("td", {}, box), el("td", { text: r.name }),
      el("td", {}, el("span", { class: `pill ${r.status}`, text: r.status })), el("td", { text: r.method }),
      el("td", { text: r.model || "" }), el("td", { text: `${r.step}${r.max_steps ? ` / ${r.max_steps}` : ""}` }),
      el("td", { text: r.loss == null ? "" : r.loss.toFixed(4) }), actions));
  }
  for (const id of ["chat-run", "export-run"]) {
    const select = $(id), keep = select.value;
    select.replaceChildren(...runs.filter((r) => r.status !== "running" && r.status !== "starting")
      .map((r) => el("option", { value: r.name, text: `${r.name} (${r.method}, ${r.status})` })));
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
  }
  drawOverlay();
}

async function drawOverlay() {
  for (const name of overlayRuns) if (!runMetrics[name]) runMetrics[name] = (await api(`/api/runs/${encodeURIComponent(name)}`)).metrics;
  const metric = $("overlay-metric").value || "loss";
  const series = [...overlayRuns].map((name) => ({ label: name, points: (runMetrics[name] || [])
    .filter((r) => typeof r[metric] === "number").map((r) => [r.step, r[metric]]) }));
  drawChart($("overlay"), `${metric} — ${overlayRuns.size ? "runs overlaid" : "tick runs above to overlay them"}`, series,
    null, true);
}

async function showReport(name) {
  const res = await fetch(`/api/runs/${encodeURIComponent(name)}/report`);
  $("run-detail").classList.remove("hidden");
  $("run-detail-name").textContent = `${name}: report.md`;
  $("run-report").textContent = await res.text();
}

// ---- chat page -----------------------------------------------------------------------------------------------
async function streamAnswer(source, messages, target) {
  const res = await fetch("/api/chat", { method: "POST", headers: { "X-Fasttune-Csrf": CSRF,
    "Content-Type": "application/json" }, body: JSON.stringify({ run: $("chat-run").value, source, messages,
    max_new_tokens: Number($("chat-max").value), temperature: Number($("chat-temp").value) }) });
  if (!res.ok) { const data = await res.json().catch(() => ({})); throw new Error(data.error || res.statusText); }
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const event = (chunk.match(/^event: (.*)$/m) || [])[1], data = (chunk.match(/^data: (.*)$/m) || [])[1];
      if (event === "token") { text += JSON.parse(data); target.textContent = text; }
      if (event === "error") throw new Error(JSON.parse(data));
    }
  }
  return text;
}

function chatColumns() {
  const mode = $("chat-source").value;
  return mode === "compare" ? [["base", "base model (adapter off)"], ["tuned", "fine-tuned"]] :
    mode === "gguf" ? [["gguf", "GGUF (llama.cpp)"]] : [["tuned", "fine-tuned"]];
}

function renderChat() {
  const box = $("chat-columns");
  box.replaceChildren();
  for (const [source, title] of chatColumns()) {
    const col = el("div", { class: "card column", "data-source": source }, el("h3", { text: title }));
    for (const turn of state.chat) {
      const text = turn.role === "user" ? turn.content : (turn.answers[source] || "");
      col.append(el("div", { class: `turn ${turn.role}` }, el("div", { class: "who", text: turn.role === "user" ?
        "you" : source }), el("div", { class: "text", text, "data-turn": String(state.chat.indexOf(turn)) })));
    }
    box.append(col);
  }
}

async function sendChat() {
  const prompt = $("chat-prompt").value.trim();
  if (!prompt || !$("chat-run").value) { setMessage("chat-message", "pick a run and type a message", true); return; }
  setMessage("chat-message", "generating…");
  $("chat-send").disabled = true;
  state.chat.push({ role: "user", content: prompt });
  const answer = { role: "assistant", answers: {} };
  state.chat.push(answer);
  $("chat-prompt").value = "";
  renderChat();
  try {
    for (const [source] of chatColumns()) {
      const history = state.chat.slice(0, -1).map((t) => t.role === "user" ? t :
        { role: "assistant", content: t.answers[source] || "" });
      const target = document.querySelector(`[data-source="${source}"] [data-turn="${state.chat.length - 1}"]`);
      answer.answers[source] = await streamAnswer(source, history, target);
    }
    setMessage("chat-message", "");
  } catch (err) { setMessage("chat-message", err.message, true); }
  $("chat-send").disabled = false;
}

// ---- export page ---------------------------------------------------------------------------------------------
let exportTimer = null;
async function refreshExport() {
  const name = $("export-run").value;
  if (!name) return;
  const st = await api(`/api/runs/${encodeURIComponent(name)}/export`);
  $("export-log").textContent = st.log;
  const body = $("export-files").querySelector("tbody");
  body.replaceChildren(...st.files.map((f) => el("tr", {}, el("td", { text: f.kind }), el("td", { text: f.path }),
    el("td", { text: bytes(f.bytes) }))));
  $("export-log").parentElement.open = st.running || $("export-log").parentElement.open;
  if (st.running) { setMessage("export-message", "exporting…"); clearTimeout(exportTimer); exportTimer = setTimeout(refreshExport, 700); }
  else if (st.returncode != null) setMessage("export-message", st.returncode === 0 ? "done" : `failed (exit ${st.returncode}); see the log`, st.returncode !== 0);
}

async function startExport() {
  const gguf = [...document.querySelectorAll("#export-gguf input:checked")].map((b) => b.value);
  try {
    await api(`/api/runs/${encodeURIComponent($("export-run").value)}/export`, { adapter: $("export-adapter").checked,
      merged: $("export-merged").checked, gguf, ollama: $("export-ollama").checked });
    setMessage("export-message", "exporting…");
    refreshExport();
  } catch (err) { setMessage("export-message", err.message, true); }
}

// ---- start -----------------------------------------------------------------------------------------------------
async function main() {
  state.schema = await api("/api/schema");
  for (const section of state.schema.sections) {
    state.recipe[section.name] = {};
    for (const f of section.fields) { state.fields[f.path] = f; state.recipe[section.name][f.name] = f.default; }
  }
  // studio defaults: a short run that finishes on a CPU (every one is a field below)
  Object.assign(state.recipe.train, { max_steps: 30, batch_size: 4, gradient_accumulation_steps: 1,
    learning_rate: 0.003, warmup_steps: 2, save_steps: 0 });
  Object.assign(state.recipe.data, { chat_template: "llama-3" });
  Object.assign(state.recipe.model, { max_seq_length: 256 });
  Object.assign(state.recipe.run, { name: "studio" });
  for (const m of state.schema.real_models) $("model-real").append(el("option", { value: m.name,
    text: `${m.name}${m.installed ? "" : " (installs on first use)"}` }));
  for (const t of state.schema.gguf_methods) {
    $("export-gguf").append(el("label", { class: "check" }, el("input", { type: "checkbox", value: t }), t));
  }
  for (const m of ["loss", "learning_rate", "grad_norm", "tokens_per_s", "reward", "kl"])
    $("overlay-metric").append(el("option", { value: m, text: m }));
  buildForm();
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showPage(b.dataset.page));
  $("model-kind").addEventListener("change", modelKindChanged);
  $("model-real").addEventListener("change", modelKindChanged);
  $("model-check").addEventListener("click", checkModel);
  $("model-browse").addEventListener("click", () => pick(null, "model.name"));
  $("data-browse").addEventListener("click", () => pick(null, "data.path"));
  $("reward-browse").addEventListener("click", () => pick(null, "rl.reward_file"));
  $("picker-close").addEventListener("click", () => $("picker").classList.add("hidden"));
  $("data-upload").addEventListener("click", () => upload().catch((err) => setMessage("train-message", err.message, true)));
  $("data-preview").addEventListener("click", () => { state.previewStart = 0; previewData(); });
  $("data-prev").addEventListener("click", () => { state.previewStart = Math.max(0, state.previewStart - 6); previewData(); });
  $("data-next").addEventListener("click", () => { state.previewStart += 6; previewData(); });
  $("train-start").addEventListener("click", startTraining);
  $("train-stop").addEventListener("click", stopTraining);
  $("train-resume").addEventListener("click", () => resumeRun(state.run));
  $("overlay-metric").addEventListener("change", drawOverlay);
  $("chat-send").addEventListener("click", sendChat);
  $("chat-reset").addEventListener("click", () => { state.chat = []; renderChat(); });
  $("chat-source").addEventListener("change", renderChat);
  $("export-start").addEventListener("click", startExport);
  $("export-run").addEventListener("change", refreshExport);
  window.addEventListener("resize", () => { if (state.rows.length) renderCharts(state.rows);
    if (overlayRuns.size) drawOverlay(); });
  onRecipeChange("train.method");
  const { running } = await api("/api/runs");
  if (running) attach(running.name);  // a run that trains (started before this tab, or by the CLI)
  document.body.dataset.ready = "1";
}

main().catch((err) => { document.body.prepend(el("div", { class: "problems card", text: `studio: ${err.message}` })); });
