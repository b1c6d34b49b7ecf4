// The page of `lora-plan serve`. It holds no planning logic: the form is drawn from the plan
// command's options (GET /api/options), every change asks GET /api/plan with the CLI's option
// names as query keys, and the chart and table show that JSON as it comes.
"use strict";

// Where the options the page knows go; any other option lands under "More options".
const GROUPS = [
  ["Model", ["model", "params", "task", "num-labels"]],
  ["Method", ["method", "rank", "targets", "dora", "double-quant", "bias", "modules-to-save"]],
  ["Training step", ["precision", "optimizer", "batch-size", "seq-len", "grad-checkpointing", "attention"]],
  ["GPUs", ["gpu", "gpu-mem", "num-gpus", "sharding", "offload", "fit", "units"]],
];
const HIDDEN = ["format", "explain"];  // the page asks for JSON, and for --explain on demand
const START = [["model", "llama-3.1-8b"], ["method", "lora,qlora"], ["rank", "8,64"]];  // an empty URL
const ON = ["", "1", "on", "true", "yes"];
const COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f"];
const PEAK_COLOR = "#3b3f47", ALLOWANCE_COLOR = "#b8bcc6";
const SVG = "http://www.w3.org/2000/svg";

let schema = [];
let extras = [];       // query pairs the form has no field for: sent as they are, so the API says why
let lastPlan = null;   // the last good plan, redrawn when only the display unit changes
let inflight = null;   // the AbortController of the request under way
let timer = null;
let ticking = null;    // the interval that shows how long a plan has taken
// this tab's name to the server, which then plans only the newest of its queued requests
const TAB = Math.random().toString(36).slice(2);

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
};
const svg = (tag, attrs = {}, text) => {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};

// --- the form, from the command's options ----------------------------------------------------

function fieldFor(opt) {
  const id = "f-" + opt.key;
  const wrap = el("div", { class: "field", "data-key": opt.key, title: opt.help });
  let input;
  if (opt.kind === "flag") {
    input = el("input", { type: "checkbox", id, name: opt.key });
    input.checked = !!opt.default;
  } else if (opt.kind === "choice") {
    input = el("select", { id, name: opt.key });
    if (opt.default === null) input.append(el("option", { value: "", text: "" }));  // not given
    for (const c of opt.choices) input.append(el("option", { value: c, text: c }));
    input.value = opt.default ?? "";
  } else if (opt.multiple && opt.key === "method" && opt.suggestions) {
    // Methods are a closed set: tick boxes. None ticked = the CLI's default.
    input = el("div", { class: "checks", id, "data-multi": "1" });
    for (const s of opt.suggestions) {
      const box = el("input", { type: "checkbox", value: s.value, name: opt.key });
      input.append(el("label", {}, box, " " + s.value));
    }
  } else {
    const attrs = { id, name: opt.key, type: "text", placeholder: opt.default ?? opt.metavar ?? "" };
    // numbers stay text inputs: whatever is typed goes to the CLI, which says what is wrong with it
    if (opt.kind === "int" || opt.kind === "float") attrs.inputmode = opt.kind === "int" ? "numeric" : "decimal";
    if (opt.suggestions) attrs.list = id + "-list";
    input = el("input", attrs);
    if (opt.suggestions) {
      const list = el("datalist", { id: id + "-list" });
      for (const s of opt.suggestions) list.append(el("option", { value: s.value, label: s.label }));
      wrap.append(list);
    }
  }
  wrap.prepend(el("label", { for: id, text: opt.key }), input);
  return wrap;
}

function buildForm() {
  const box = $("fields");
  const byKey = Object.fromEntries(schema.map((o) => [o.key, o]));
  const placed = new Set(HIDDEN);
  for (const [title, keys] of GROUPS) {
    const set = el("fieldset", {}, el("legend", { text: title }));
    for (const key of keys) {
      if (!byKey[key]) continue;  // an option that is gone: nothing to draw
      set.append(fieldFor(byKey[key]));
      placed.add(key);
    }
    box.append(set);
  }
  $("fields").firstElementChild.append(...$("upload-box").childNodes);  // upload sits under Model
  $("upload-box").remove();
  const more = el("details", { class: "more" }, el("summary", { text: "More options" }));
  for (const opt of schema) if (!placed.has(opt.key)) more.append(fieldFor(opt));
  box.append(el("fieldset", {}, more));
}

// The query, option by option, leaving out what equals the CLI's default.
function formPairs() {
  const pairs = [];
  for (const opt of schema) {
    if (HIDDEN.includes(opt.key)) continue;
    const input = $("f-" + opt.key);
    if (opt.kind === "flag") {
      if (input.checked !== !!opt.default && (input.checked || opt.off_key)) {
        pairs.push([opt.key, input.checked ? "on" : "off"]);
      }
    } else if (input.dataset.multi) {
      const ticked = [...input.querySelectorAll("input:checked")].map((b) => b.value);
      if (ticked.length) pairs.push([opt.key, ticked.join(",")]);
    } else {
      const value = input.value.trim();
      if (value !== "" && value !== String(opt.default ?? "")) pairs.push([opt.key, value]);
    }
  }
  return pairs.concat(extras);
}

function setForm(params) {
  extras = [];
  const joined = new Map();
  for (const [k, v] of params) joined.set(k, joined.has(k) ? joined.get(k) + "," + v : v);
  for (const opt of schema) {
    if (HIDDEN.includes(opt.key)) continue;
    const input = $("f-" + opt.key);
    if (opt.kind === "flag") {
      input.checked = joined.has(opt.off_key) ? false
        : joined.has(opt.key) ? ON.includes(joined.get(opt.key).toLowerCase()) : !!opt.default;
    } else if (input.dataset.multi) {
      const want = (joined.get(opt.key) || "").split(",").map((s) => s.trim());
      for (const b of input.querySelectorAll("input")) b.checked = want.includes(b.value);
    } else if (opt.kind === "choice") {
      const want = joined.get(opt.key) ?? opt.default ?? "";
      input.value = want;
      // not one of the choices: sent as written, so the planner's error says so
      if (input.value !== want) { input.value = opt.default ?? ""; extras.push([opt.key, want]); }
    } else {
      input.value = joined.get(opt.key) ?? "";
    }
  }
  const known = new Set(schema.flatMap((o) => [o.key, o.off_key]));
  for (const [k, v] of params) if (!known.has(k)) extras.push([k, v]);
  // a link that sets an option under "More options" opens it, so the page shows what is planned
  const more = document.querySelector("details.more");
  const set = new Set(formPairs().map(([k]) => k));
  if ([...more.querySelectorAll(".field")].some((f) => set.has(f.dataset.key))) more.open = true;
}

// --- asking the planner ----------------------------------------------------------------------

function query() {
  return new URLSearchParams(formPairs()).toString();
}

// Typing waits for a pause (120 ms) before asking; a click or a pick from a list asks at once.
function schedule(typing) {
  clearTimeout(timer);
  timer = setTimeout(refresh, typing ? 120 : 0);
}

async function refresh() {
  const qs = query();
  history.replaceState(null, "", qs ? "?" + qs : location.pathname);
  $("link").href = location.href;
  if (inflight) inflight.abort();
  const controller = (inflight = new AbortController());
  document.body.dataset.state = "loading";
  const started = performance.now();
  $("status").textContent = "planning…";
  clearInterval(ticking);  // a plan that takes long (--fit on a big model) counts its seconds
  ticking = setInterval(() => {
    if (document.body.dataset.state !== "loading") return clearInterval(ticking);
    $("status").textContent = `planning… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 250);
  try {
    const response = await fetch("/api/plan?" + qs, { signal: controller.signal,
                                                      headers: { "X-Lora-Plan-Channel": TAB + ":plan" } });
    const body = await response.text();
    if (controller !== inflight) return;
    $("command").textContent = decodeURIComponent(response.headers.get("X-Lora-Plan-Command") || "");
    if (!response.ok) {
      showError(body);
    } else {
      lastPlan = JSON.parse(body);
      $("error").hidden = true;
      draw(lastPlan);
      if ($("explain-box").open) explain(qs);
      document.body.dataset.state = "ready";
      $("status").textContent = "";
    }
    answered(qs);
  } catch (err) {
    if (err.name === "AbortError") return;
    showError("Error: the lora-plan server did not answer (" + err.message + ")");
    answered(qs);
  }
}

// Marks on <body> for whoever watches the page (the browser tests): what was last answered.
function answered(qs) {
  document.body.dataset.query = qs;
  document.body.dataset.answers = String(Number(document.body.dataset.answers || 0) + 1);
}

function showError(text) {
  $("error").textContent = text.trim().split("\n").pop();
  $("error").hidden = false;
  document.body.dataset.state = "error";
  $("status").textContent = "";
}

async function explain(qs) {
  $("explain").textContent = "…";
  try {
    const response = await fetch("/api/plan?" + (qs ? qs + "&" : "") + "explain=on",
                                 { headers: { "X-Lora-Plan-Channel": TAB + ":explain" } });
    if (response.status === 409) return;  // a newer derivation is on its way
    $("explain").textContent = await response.text();
  } catch (err) {
    $("explain").textContent = "Error: the lora-plan server did not answer (" + err.message + ")";
  }
}

async function upload(file) {
  const response = await fetch("/api/config?filename=" + encodeURIComponent(file.name),
                               { method: "POST", body: await file.arrayBuffer() });
  const body = await response.text();
  if (!response.ok) {
    showError(body);
    answered("upload");
    return;
  }
  $("f-model").value = JSON.parse(body).model;
  $("f-params").value = "";
  refresh();
}

// --- drawing the plan ------------------------------------------------------------------------

function unitOf() {
  const u = $("f-units");
  return u && u.value === "GiB" ? ["GiB", 2 ** 30] : ["GB", 1e9];
}

function size(bytes) {
  const [name, scale] = unitOf();
  const v = bytes / scale;  // below one unit, three significant digits: a 13.6 MB adapter is 0.0136 GB
  const digits = v !== 0 && Math.abs(v) < 1 ? { maximumSignificantDigits: 3 }
    : { maximumFractionDigits: 2, minimumFractionDigits: 2 };
  return v.toLocaleString("en-US", digits) + " " + name;
}

const label = (p) => (p.rank === null ? p.method : `${p.method} r=${p.rank}`);
const termName = (k) => k.replace(/_/g, " ");

function niceStep(max) {
  const raw = max / 5, mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
}

function draw(plan) {
  drawChart(plan);
  drawSummary(plan);
  const best = plan.plans.map((p) => p.memory_bytes.peak + (p.device_overhead_bytes || 0));
  const perGpu = plan.setup.num_gpus ? ` per GPU (${plan.setup.num_gpus} GPUs, ${plan.setup.sharding})` : "";
  $("headline").textContent = `${plan.model.name}: ${plan.plans.length} plan${plan.plans.length > 1 ? "s" : ""} on `
    + `${plan.gpu.name} (${size(plan.gpu.memory_bytes)})${perGpu}; lowest peak with allowance `
    + size(Math.min(...best));
  $("notes").replaceChildren(...plan.notes.map((n) => el("li", { text: n })));
}

function drawChart(plan) {
  const [uname, uscale] = unitOf();
  const terms = Object.keys(plan.plans[0]?.memory_bytes || {}).filter((k) => k !== "peak");
  const W = 760, H = 340, left = 62, right = 128, top = 16, bottom = 46;
  const capacity = plan.gpu.memory_bytes;
  const stackOf = (p) => terms.reduce((s, k) => s + p.memory_bytes[k], 0);
  const peakOf = (p) => p.memory_bytes.peak + (p.device_overhead_bytes || 0);
  const max = Math.max(capacity, ...plan.plans.map(stackOf), ...plan.plans.map(peakOf)) * 1.05;
  const step = niceStep(max / uscale) * uscale;
  const top_ = Math.ceil(max / step) * step;
  const y = (b) => top + (H - top - bottom) * (1 - b / top_);
  const px = (H - top - bottom) / top_;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-px-per-byte": px,
                            "aria-label": "memory by term against the GPU's capacity" });
  const axis = svg("g", { class: "axis" });
  for (let v = 0; v <= top_ + 1; v += step) {
    axis.append(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    axis.append(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, `${+(v / uscale).toFixed(1)}`));
  }
  axis.append(svg("text", { x: 12, y: top + (H - top - bottom) / 2, transform: `rotate(-90 12 ${top + (H - top - bottom) / 2})`,
                            "text-anchor": "middle" }, uname));
  root.append(axis);
  const n = plan.plans.length, slot = (W - left - right) / Math.max(n, 1);
  const bar = Math.min(46, slot * 0.32);
  const labels = svg("g", { class: "labels" });  // drawn last, over the capacity line
  plan.plans.forEach((p, i) => {
    const x0 = left + slot * i + slot / 2 - bar - 3, x1 = x0 + bar + 6;
    const g = svg("g", { class: "plan", "data-plan": i, "data-label": label(p) });
    let base = 0;
    terms.forEach((k, t) => {
      const b = p.memory_bytes[k];
      const r = svg("rect", { class: "seg", "data-term": k, "data-bytes": b, x: x0, width: bar,
                              y: y(base + b), height: y(base) - y(base + b), fill: COLORS[t % COLORS.length] });
      r.append(svg("title", {}, `${label(p)} ${termName(k)}: ${size(b)}`));
      g.append(r);
      base += b;
    });
    const peak = p.memory_bytes.peak, over = p.device_overhead_bytes || 0;
    const pr = svg("rect", { class: "seg", "data-term": "peak", "data-bytes": peak, x: x1, width: bar,
                             y: y(peak), height: y(0) - y(peak), fill: PEAK_COLOR });
    pr.append(svg("title", {}, `${label(p)} step peak: ${size(peak)}${p.peak_phase ? ", set in " + p.peak_phase : ""}`));
    g.append(pr);
    if (over) {
      const ar = svg("rect", { class: "seg", "data-term": "device_overhead", "data-bytes": over, x: x1, width: bar,
                               y: y(peak + over), height: y(peak) - y(peak + over), fill: ALLOWANCE_COLOR });
      ar.append(svg("title", {}, `${label(p)} CUDA context/cache allowance: ${size(over)}`));
      g.append(ar);
    }
    labels.append(svg("text", { x: x1 + bar / 2, y: y(peak + over) - 4, "text-anchor": "middle", class: "peak-label" },
                 `${+(peak / uscale).toFixed(1)}${p.peak_phase ? " " + p.peak_phase : ""}`));
    g.append(svg("text", { x: left + slot * i + slot / 2, y: H - bottom + 16, "text-anchor": "middle" }, label(p)));
    g.append(svg("text", { x: left + slot * i + slot / 2, y: H - bottom + 30, "text-anchor": "middle", class: "sub" },
                 "terms · peak"));
    root.append(g);
  });
  root.append(svg("line", { class: "capacity", x1: left, x2: W - right + 6, y1: y(capacity), y2: y(capacity),
                            "data-bytes": capacity }));
  root.append(svg("text", { class: "capacity-label", x: W - right + 10, y: y(capacity) + 4 },
                  `${plan.gpu.name}`));
  root.append(svg("text", { class: "capacity-label", x: W - right + 10, y: y(capacity) + 18 }, size(capacity)));
  root.append(labels);
  $("chart").replaceChildren(root);
  const swatch = (color, text) => el("span", {}, el("i", { style: `background:${color}` }), text);
  $("legend").replaceChildren(
    ...terms.map((k, t) => swatch(COLORS[t % COLORS.length], termName(k))),
    swatch(PEAK_COLOR, "step peak (allocator), labelled with its phase"),
    swatch(ALLOWANCE_COLOR, "+ CUDA context/cache"),
    el("span", {}, el("i", { style: "background:#b3261e;height:2px;vertical-align:3px" }), "GPU capacity"),
  );
}

function drawSummary(plan) {
  const plans = plan.plans;
  const count = (n) => (n === null ? "does not fit" : String(n));
  const rows = [
    ["trainable params", (p) => `${p.trainable_params.toLocaleString("en-US")} (${p.trainable_percent.toPrecision(3)}%)`],
    ["LoRA targets", (p) => p.target_modules.join(", ") || "-"],
    ["peak (allocator)", (p) => size(p.memory_bytes.peak)],
    ["peak set in", (p) => p.peak_phase || "-"],
    ["+ CUDA context/cache", (p) => (p.device_overhead_bytes === null ? "-" : size(p.device_overhead_bytes))],
    // the planner's gpus_needed, green where it is within the GPUs asked for (one by default)
    [`GPUs needed (${plan.gpu.name}, ${plan.setup.num_gpus ? plan.setup.sharding : "no sharding"})`,
      (p) => [count(p.gpus_needed), p.gpus_needed !== null && p.gpus_needed <= (plan.setup.num_gpus || 1) ? "fits" : "nofit"]],
    ["fewest GPUs " + Object.keys(plans[0]?.min_gpus || {}).join("/"), (p) => Object.values(p.min_gpus).map((n) => (n === null ? "-" : n)).join("/")],
    ["adapter / trained checkpoint", (p) => size(p.checkpoint_bytes)],
    ["full model checkpoint", (p) => size(p.full_checkpoint_bytes)],
  ];
  if (plan.setup.offload !== "none") rows.push(["CPU memory per GPU", (p) => size(p.cpu_offload_bytes)]);
  if (plans.some((p) => p.fit)) {
    rows.push([`largest batch at ${plan.setup.seq_len} tokens`, (p) => (p.fit ? count(p.fit.max_batch_size || null) : "-")]);
    rows.push([`longest sequence at batch ${plan.setup.batch_size}`, (p) => (p.fit ? count(p.fit.max_seq_len || null) : "-")]);
  }
  if (plans.some((p) => p.wall_hours !== null)) {
    rows.push(["wall time", (p) => (p.wall_hours === null ? "-" : `${p.wall_hours.toFixed(2)} h on ${p.num_gpus_for_time}`)]);
    rows.push(["cost (USD)", (p) => (p.cost_usd === null ? "-" : "$" + Math.round(p.cost_usd).toLocaleString("en-US"))]);
  }
  const table = $("summary");
  table.replaceChildren(el("tr", {}, el("th", { text: "" }), ...plans.map((p) => el("th", { text: label(p) }))));
  for (const [name, cell] of rows) {
    const tr = el("tr", {}, el("td", { text: name }));
    for (const p of plans) {
      const v = cell(p);
      tr.append(Array.isArray(v) ? el("td", { class: v[1], text: v[0] }) : el("td", { text: v }));
    }
    table.append(tr);
  }
}

// --- wiring ----------------------------------------------------------------------------------

async function start() {
  schema = await (await fetch("/api/options")).json();
  buildForm();
  const params = [...new URLSearchParams(location.search)];
  setForm(params.length ? params : START);
  $("form").addEventListener("input", (e) => {
    if (e.target.id === "upload") return;
    const key = e.target.closest(".field")?.dataset.key;
    extras = extras.filter(([k]) => k !== key);  // a field set by hand replaces what the link said
    if (e.target.id === "f-units" && lastPlan && !extras.length) { draw(lastPlan); }
    schedule(e.target.type === "text");
  });
  $("upload").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  $("explain-box").addEventListener("toggle", () => { if ($("explain-box").open) explain(query()); });
  $("copy-command").addEventListener("click", () => navigator.clipboard?.writeText($("command").textContent));
  refresh();
}

start();
