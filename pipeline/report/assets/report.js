/* onion report: draws the page from the data files (data/*.js) loaded before this script.
 *
 * Every piece of data reaches the page as text (textContent, attribute values through the DOM),
 * never as HTML, so names holding <, " or & are shown as they are. Nothing is fetched: images are
 * thumbnails in this folder, charts are SVG drawn here.
 */
"use strict";

(function () {
  const R = ONION.report, E = ONION.examples, SEL = ONION.selections, SC = ONION.scores;
  const N = E.key.length;
  const PAGE_SIZES = [60, 120, 240];
  const CODE = new Int16Array(128).fill(-1);
  "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_".split("").forEach((c, i) => { CODE[c.charCodeAt(0)] = i; });
  const hasThumb = new Uint8Array(N);
  E.thumb.forEach((i) => { hasThumb[i] = 1; });
  const classNames = R.dataset.class_names || [];
  const versions = R.selections;
  const byVersion = {};
  versions.forEach((v) => { byVersion[v.version] = v; });
  const shown = versions.filter((v) => v.shown);
  const state = { tab: "dataset", version: R.default_selection, scorer: "", cls: "", reason: "", round: "",
    status: "all", sort: "desc", onlyThumbs: false, page: 0, pageSize: PAGE_SIZES[0], key: "",
    diffFrom: "", diffTo: "" };

  /* ---------- small DOM helpers ---------- */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = String(value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "data") Object.entries(value).forEach(([k, v]) => { el.dataset[k] = String(v); });
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }
  const S = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(S, tag);
    for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }
  const fmt = (n) => (n === null || n === undefined || Number.isNaN(n) ? "–" : Number(n).toLocaleString("en-US"));
  function num(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (Number.isInteger(x)) return x.toLocaleString("en-US");
    return Number(x).toPrecision(digits || 4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }
  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }
  function stat(label, value, kind, data) {
    return h("div", { class: "stat " + (kind || ""), data: data || {} },
      h("div", { class: "value", text: value }), h("div", { class: "label", text: label }));
  }
  function table(headers, rows, attrs) {
    return h("table", attrs || {},
      h("thead", {}, h("tr", {}, headers.map((x) => (typeof x === "string" ? h("th", { text: x }) : x)))),
      h("tbody", {}, rows));
  }
  const className = (label) => (label >= 0 ? (label < classNames.length ? classNames[label] : String(label)) : "–");
  function thumb(i, cls) {
    if (hasThumb[i]) return h("img", { class: "thumb " + (cls || ""), src: "thumbs/" + i + ".png", alt: E.key[i] });
    const why = E.shard[i] < 0 ? "no stored image" : "no thumbnail (sampled)";
    return h("div", { class: "thumb none " + (cls || ""), text: why });
  }
  const keyLink = (i) => h("a", { class: "key", href: "#example=" + encodeURIComponent(E.key[i]), text: E.key[i] });
  const empty = (text) => h("div", { class: "empty", text: text });
  function paged(headers, items, row, size, attrs) {  // a table of many rows, a page at a time
    const box = h("div", {});
    let page = 0;
    const draw = () => {
      const pages = Math.max(1, Math.ceil(items.length / size));
      const pager = items.length <= size ? null : h("div", { class: "pager" },
        h("button", { class: "ghost", disabled: page === 0, onclick: () => { page -= 1; draw(); } }, "‹ previous"),
        `rows ${fmt(page * size + 1)}-${fmt(Math.min(items.length, (page + 1) * size))} of ${fmt(items.length)}`,
        h("button", { class: "ghost", disabled: page >= pages - 1, onclick: () => { page += 1; draw(); } }, "next ›"));
      box.replaceChildren(h("div", { class: "panel" }, table(headers, items.slice(page * size, (page + 1) * size).map(row), attrs)), pager || "");
    };
    draw();
    return box;
  }

  /* ---------- the data: selections, scores, lineage ---------- */
  const decodedCache = {};
  function decoded(version) {
    if (decodedCache[version]) return decodedCache[version];
    const meta = byVersion[version], codes = SEL[version].codes, width = meta.width;
    const status = new Int8Array(N), code = new Int16Array(N).fill(-1);  // status: 0 absent, 1 kept, 2 dropped, 3 quarantined
    const kindStatus = meta.reasons.map(([kind, kept]) => (kept ? 1 : kind === "quarantined" ? 3 : 2));
    for (let i = 0; i < N; i += 1) {
      let c;
      if (width === 1) { c = CODE[codes.charCodeAt(i)]; } else {
        const a = CODE[codes.charCodeAt(2 * i)], b = CODE[codes.charCodeAt(2 * i + 1)];
        c = a < 0 ? -1 : a * 64 + b;
      }
      if (c >= 0) { code[i] = c; status[i] = kindStatus[c]; }
    }
    decodedCache[version] = { status, code, meta, details: SEL[version].details };
    return decodedCache[version];
  }
  const STATUS = ["absent", "kept", "dropped", "quarantined"];
  function reasonOf(d, i) {
    const kind = d.meta.reasons[d.code[i]][0], detail = d.details[i];
    return detail === undefined ? kind : kind + ":" + detail;
  }
  function roundOf(kind) {  // when the decision was made: unforgettable@r2 -> round 2, well-learned@e4 -> epoch 4
    const m = /@([re])(\d+)$/.exec(kind);
    if (m) return (m[1] === "r" ? "round " : "epoch ") + m[2];
    return kind === "random-initial" ? "round 0" : "";
  }
  const arrayCache = {};
  function scoreArray(ref) {
    if (ref === null || ref === undefined) return null;
    if (!arrayCache[ref]) arrayCache[ref] = Float64Array.from(SC.arrays[ref], (x) => (x === null ? NaN : x));
    return arrayCache[ref];
  }
  const scorerByName = {};
  R.scorers.forEach((x) => { scorerByName[x.name] = x; });
  function currentScores() {
    if (state.scorer) return scoreArray(scorerByName[state.scorer].ref);
    return state.version ? scoreArray(byVersion[state.version].score) : null;
  }
  function words(kind, kept) {  // a decision as a person says it
    const round = roundOf(kind);
    if (kept) return kind.startsWith("restored") ? "restored in " + round : "kept";
    if (kind === "quarantined") return "quarantined";
    const what = kind.replace(/@[re]\d+$/, "");
    return "dropped as " + what + (round ? " in " + round : "");
  }
  function findKey(key) {  // keys are sorted: binary search
    let lo = 0, hi = N - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (E.key[mid] === key) return mid;
      if (E.key[mid] < key) lo = mid + 1; else hi = mid - 1;
    }
    return -lo - 1;
  }

  /* ---------- charts (inline SVG) ---------- */
  const COLORS = ["#5b3cc4", "#1f8a4c", "#c23b3b", "#b7791f", "#1c7ed6", "#d6336c", "#0ca678", "#495057"];
  function axisTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    const nice = [1, 2, 5, 10].map((m) => m * step).find((st) => (hi - lo) / st <= n) || step * 10;
    const ticks = [];
    for (let t = Math.ceil(lo / nice) * nice; t <= hi + nice * 1e-9; t += nice) ticks.push(Number(t.toPrecision(12)));
    return ticks;
  }
  function frame(w, hgt, x0, x1, y0, y1, xLabel) {
    const m = { l: 48, r: 12, t: 10, b: 34 };
    const X = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * (w - m.l - m.r);
    const Y = (y) => hgt - m.b - ((y - y0) / (y1 - y0 || 1)) * (hgt - m.t - m.b);
    const g = s("g", {});
    axisTicks(y0, y1, 5).forEach((t) => {
      g.append(s("line", { x1: m.l, x2: w - m.r, y1: Y(t), y2: Y(t), stroke: "#eef0f4" }));
      g.append(s("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end" }, num(t, 3)));
    });
    axisTicks(x0, x1, 8).forEach((t) => {
      g.append(s("text", { x: X(t), y: hgt - m.b + 16, "text-anchor": "middle" }, num(t, 3)));
    });
    g.append(s("line", { x1: m.l, x2: w - m.r, y1: hgt - m.b, y2: hgt - m.b, stroke: "#b8c0cc" }));
    if (xLabel) g.append(s("text", { x: (m.l + w - m.r) / 2, y: hgt - 4, "text-anchor": "middle" }, xLabel));
    return { X, Y, g };
  }
  function legend(items) {
    return h("div", { class: "legend" }, items.map(([name, color]) => h("span", {}, h("i", { class: "swatch", data: { color } }), name)));
  }
  function paintSwatches(root) {  // colours through the CSSOM (the page allows no inline style attributes)
    root.querySelectorAll("i.swatch").forEach((el) => { el.style.background = el.dataset.color; });
  }
  function lineChart(title, series, xLabel) {
    const w = 460, hgt = 230;
    const points = series.flatMap((x) => x.xs.map((v, i) => [v, x.ys[i]])).filter(([a, b]) => a !== null && b !== null);
    const box = h("div", { class: "chart" }, h("div", { class: "title", text: title }));
    if (!points.length) { box.append(h("div", { class: "note", text: "nothing recorded" })); return box; }
    const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
    let y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const pad = (y1 - y0) * 0.06;
    const f = frame(w, hgt, Math.min(...xs), Math.max(...xs), y0 - pad, y1 + pad, xLabel);
    const svg = s("svg", { viewBox: `0 0 ${w} ${hgt}`, role: "img" }, s("title", {}, title), f.g);
    series.forEach((x) => {
      const pts = x.xs.map((v, i) => [v, x.ys[i]]).filter(([a, b]) => a !== null && b !== null);
      if (pts.length > 1) {
        svg.append(s("polyline", { points: pts.map(([a, b]) => `${f.X(a).toFixed(1)},${f.Y(b).toFixed(1)}`).join(" "),
          fill: "none", stroke: x.color, "stroke-width": 2, "stroke-dasharray": x.dash || "none" }));
      }
      pts.forEach(([a, b]) => svg.append(s("circle", { cx: f.X(a).toFixed(1), cy: f.Y(b).toFixed(1), r: 2.6, fill: x.color })));
    });
    const runs = [], styles = [];
    series.forEach((x) => {
      if (x.run !== undefined && !runs.some(([name]) => name === x.run)) runs.push([x.run, x.color]);
      if (!styles.includes(`${x.name}: ${DASH_WORDS[x.dash || "none"]}`)) styles.push(`${x.name}: ${DASH_WORDS[x.dash || "none"]}`);
    });
    box.append(svg, legend(runs.length ? runs : series.map((x) => [x.name, x.color])));
    if (runs.length && styles.length > 1) box.append(h("div", { class: "note", text: styles.join(" · ") }));
    paintSwatches(box);
    return box;
  }
  const DASH_WORDS = { none: "solid", "5 3": "dashed", "1 3": "dotted" };
  function shortName(path) {  // the run folder's own name, unless two runs share it
    const base = (p) => p.replace(/\/+$/, "").split("/").pop();
    return R.runs.filter((r) => base(r.name) === base(path)).length > 1 ? path : base(path);
  }
  function histogram(title, groups, xLabel) {  // groups: [{name, values: Float64Array, color}], overlaid
    const w = 560, hgt = 240, bins = 30;
    const all = groups.flatMap((g) => Array.from(g.values)).filter((x) => !Number.isNaN(x));
    const box = h("div", { class: "chart", id: "histogram" }, h("div", { class: "title", text: title }));
    if (!all.length) {
      box.append(h("div", { class: "note", text: "no scores to draw: this selection used none (random or round 0); choose a scorer above" }));
      return box;
    }
    let lo = Infinity, hi = -Infinity;  // a loop: spreading a million values into Math.min overflows the stack
    for (const x of all) { if (x < lo) lo = x; if (x > hi) hi = x; }
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const counts = groups.map((g) => {
      const c = new Array(bins).fill(0);
      g.values.forEach((x) => { if (!Number.isNaN(x)) c[Math.min(bins - 1, Math.floor(((x - lo) / (hi - lo)) * bins))] += 1; });
      return c;
    });
    const top = Math.max(1, ...counts.flat());
    const f = frame(w, hgt, lo, hi, 0, top * 1.05, xLabel);
    const svg = s("svg", { viewBox: `0 0 ${w} ${hgt}`, role: "img" }, s("title", {}, title), f.g);
    counts.forEach((c, gi) => c.forEach((n, b) => {
      if (!n) return;
      const x0 = f.X(lo + (b / bins) * (hi - lo)), x1 = f.X(lo + ((b + 1) / bins) * (hi - lo));
      svg.append(s("rect", { x: x0.toFixed(1), y: f.Y(n).toFixed(1), width: Math.max(1, x1 - x0 - 1).toFixed(1),
        height: (f.Y(0) - f.Y(n)).toFixed(1), fill: groups[gi].color, "fill-opacity": 0.55 }));
    }));
    box.append(svg, legend(groups.map((g, gi) => [`${g.name} (${fmt(counts[gi].reduce((a, b) => a + b, 0))} scored)`, g.color])));
    const unscored = groups.reduce((a, g) => a + g.values.filter((x) => Number.isNaN(x)).length, 0);
    if (unscored) box.append(h("div", { class: "note", text: `${fmt(unscored)} kept or dropped examples have no score here and are not drawn` }));
    paintSwatches(box);
    return box;
  }

  /* ---------- tabs ---------- */
  const TABS = [["dataset", "Dataset"], ["selection", "Selection"], ["example", "Example"], ["diff", "Compare"],
    ["duplicates", "Duplicates"], ["training", "Training"]];
  const rendered = {};
  function showTab(name) {
    state.tab = name;
    document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.tab === name));
    TABS.forEach(([id]) => { document.getElementById("tab-" + id).hidden = id !== name; });
    if (!rendered[name]) { rendered[name] = true; RENDER[name](); }
  }
  function route() {
    let hash = location.hash.slice(1);
    try { hash = decodeURIComponent(hash); } catch (error) { /* a hand-typed "%": use it as written */ }
    if (hash.startsWith("example=")) {
      showTab("example");
      openExample(hash.slice("example=".length));
    } else if (TABS.some(([id]) => id === hash)) {
      showTab(hash);
    } else {
      showTab(state.tab);
    }
  }

  /* ---------- Dataset ---------- */
  function renderDataset() {
    const root = document.getElementById("tab-dataset"), d = R.dataset, counts = d.counts;
    const statuses = Object.keys(counts.by_status).sort(), splits = Object.keys(counts.by_split).sort();
    const shardBytes = d.shards.reduce((a, x) => a + x.bytes, 0);
    root.append(h("div", { class: "cards", id: "dataset-cards" },
      stat("examples", fmt(counts.total), "", { count: "total" }),
      statuses.map((st) => stat(st, fmt(counts.by_status[st]), st === "ok" ? "kept" : "quarantined", { count: st })),
      stat("classes", fmt(classNames.length)), stat("shards", fmt(d.shards.length)), stat("stored", bytes(shardBytes))));
    if (d.accounting) {
      root.append(h("p", { class: "note", text: `Accounting: ${fmt(d.accounting.inputs)} inputs = ${fmt(d.accounting.ok)} ok + ${fmt(d.accounting.quarantined)} quarantined. Source: ${d.source}.` }));
    }
    const splitRows = splits.map((sp) => h("tr", { data: { split: sp } }, h("td", { text: sp }),
      statuses.map((st) => h("td", { class: "num", data: { status: st }, text: fmt(counts.by_split_status[sp + "/" + st] || 0) })),
      h("td", { class: "num", text: fmt(counts.by_split[sp]) })));
    const perSplit = d.classes_by_split, classSplits = Object.keys(perSplit);
    const classRows = classNames.map((name) => h("tr", { data: { class: name } }, h("td", { class: "text", text: name }),
      classSplits.map((sp) => h("td", { class: "num", data: { split: sp }, text: fmt(perSplit[sp][name] || 0) })),
      h("td", { class: "num", text: fmt(classSplits.reduce((a, sp) => a + (perSplit[sp][name] || 0), 0)) })));
    root.append(h("div", { class: "grid2" },
      h("div", {}, h("h2", { text: "Examples by split and status" }),
        h("div", { class: "panel" }, table(["split", ...statuses.map((x) => h("th", { class: "num", text: x })), h("th", { class: "num", text: "all" })], splitRows, { id: "split-status" }))),
      h("div", {}, h("h2", { text: "Classes (status ok)" }),
        h("div", { class: "panel" }, table(["class", ...classSplits.map((x) => h("th", { class: "num", text: x })), h("th", { class: "num", text: "all" })], classRows, { id: "classes" })))));
    const q = d.quarantined;
    root.append(h("h2", { text: `Quarantined inputs: ${fmt(q.length)}` }));
    if (!q.length) { root.append(empty("Every input became an example.")); } else {
      root.append(h("div", { class: "chips" }, Object.entries(d.quarantine_reasons).map(([r, n]) => h("span", { class: "badge quarantined", text: `${r}: ${fmt(n)}` }))));
      root.append(paged(["image", "key", "split", "source", "reason"], q, (row) => {
        const i = findKey(row.key);
        return h("tr", { data: { key: row.key } }, h("td", {}, i >= 0 ? thumb(i, "small-thumb") : ""),
          h("td", {}, i >= 0 ? keyLink(i) : row.key), h("td", { text: row.split }),
          h("td", { class: "text mono", text: row.source_ref }), h("td", { class: "text", text: row.reason }));
      }, 50, { id: "quarantined" }));
      root.append(h("p", { class: "note", text: "A quarantined input has no bytes in the shards, so there is no image to show unless one was stored." }));
    }
    root.append(h("details", {}, h("summary", { text: `Shards: ${fmt(d.shards.length)}, ${bytes(shardBytes)}` }),
      h("div", { class: "panel" }, table(["shard", "split", h("th", { class: "num", text: "examples" }), h("th", { class: "num", text: "size" }), "sha256"],
        d.shards.map((x) => h("tr", {}, h("td", { class: "mono", text: x.name }), h("td", { text: x.split }),
          h("td", { class: "num", text: fmt(x.examples) }), h("td", { class: "num", text: bytes(x.bytes) }),
          h("td", { class: "mono", text: x.sha256.slice(0, 16) })))))));
  }

  /* ---------- Selection: summary, histogram, gallery ---------- */
  function versionLabel(v) {
    const m = byVersion[v];
    const what = m.round !== null && m.strategy === "rounds" ? `round ${m.round}` : m.strategy || "";
    return `${v} · ${what}`;
  }
  function renderSelection() {
    const root = document.getElementById("tab-selection");
    root.replaceChildren();
    if (!versions.length) {
      root.append(empty("No selections yet. Make one with: onion select DATASET ... (or onion curate)."));
      return;
    }
    const v = byVersion[state.version], summary = v.summary;
    const pick = h("select", { id: "version", onchange: (ev) => { state.version = ev.target.value; state.page = 0; state.reason = ""; state.round = ""; renderSelection(); } },
      shown.map((x) => h("option", { value: x.version, selected: x.version === state.version, text: versionLabel(x.version) })));
    root.append(h("div", { class: "controls" }, h("label", {}, "selection", pick),
      h("div", { class: "note", text: shown.length < versions.length ? `${shown.length} of ${versions.length} versions in this report (onion report --all-selections shows all); lineage covers all` : "" })));
    const flat = (obj, prefix) => Object.entries(obj || {}).flatMap(([k, x]) => (x && typeof x === "object" ? flat(x, prefix + k + ".") : [[prefix + k, x]]));
    root.append(h("div", { class: "chips", id: "parameters" }, [["strategy", v.strategy], ["round", v.round], ["parent", v.parent || "none"]]
      .concat(flat(v.parameters, "").filter(([k]) => !["round", "parent"].includes(k)))
      .map(([k, x]) => h("span", { class: "badge plain", text: `${k}: ${x === null ? "none" : x}` }))));
    const c = summary.counts;
    root.append(h("div", { class: "cards", id: "selection-cards" },
      stat("kept", fmt(c.kept || 0), "kept", { count: "kept" }), stat("dropped", fmt(c.dropped || 0), "dropped", { count: "dropped" }),
      stat("quarantined", fmt(c.quarantined || 0), "quarantined", { count: "quarantined" }), stat("train examples", fmt(summary.examples), "", { count: "examples" })));
    const classRows = Object.entries(summary.by_class).map(([name, n]) => {
      const total = (n.kept || 0) + (n.dropped || 0) + (n.quarantined || 0);
      const bar = h("div", { class: "bar" }, h("span", {}));
      bar.firstChild.style.width = (total ? (100 * (n.kept || 0)) / total : 0) + "%";
      return h("tr", { data: { class: name } }, h("td", { class: "text", text: name }),
        ["kept", "dropped", "quarantined"].map((st) => h("td", { class: "num", data: { status: st }, text: fmt(n[st] || 0) })),
        h("td", { class: "num", text: fmt(total) }), h("td", {}, bar));
    });
    const reasonRows = Object.entries(summary.by_reason).map(([reason, n]) => {
      const kept = v.reasons.some(([k, kk]) => k === reason && kk);
      return h("tr", { data: { reason } }, h("td", {}, h("span", { class: "badge " + (kept ? "kept" : reason === "quarantined" ? "quarantined" : "dropped"), text: reason })),
        h("td", { text: roundOf(reason) || "–" }), h("td", { class: "num", text: fmt(n) }));
    });
    const n = (x) => h("th", { class: "num", text: x });
    root.append(h("div", { class: "grid2" },
      h("div", {}, h("h2", { text: "Per class" }), h("div", { class: "panel" }, table(["class", n("kept"), n("dropped"), n("quarantined"), n("all"), "kept share"], classRows, { id: "selection-classes" }))),
      h("div", {}, h("h2", { text: "Per reason" }), h("div", { class: "panel" }, table(["reason", "when", n("examples")], reasonRows, { id: "selection-reasons" })),
        h("div", { id: "hist-holder" }))));
    root.append(h("h2", { text: "Examples" }));
    root.append(galleryControls(), h("div", { class: "pager", id: "gallery-pager" }), h("div", { class: "gallery", id: "gallery" }),
      h("div", { class: "pager", id: "gallery-pager-bottom" }));
    drawHistogram();
    drawGallery();
  }
  function scorerOptions() {
    return [h("option", { value: "", text: "this selection's score" }),
      R.scorers.map((x) => h("option", { value: x.name, selected: state.scorer === x.name, text: `${x.name} (${x.scorer})` }))];
  }
  function drawHistogram() {
    const holder = document.getElementById("hist-holder");
    const d = decoded(state.version), scores = currentScores();
    const pick = (st) => {
      const out = [];
      if (scores) for (let i = 0; i < N; i += 1) if (d.status[i] === st) out.push(scores[i]);
      return Float64Array.from(out);
    };
    const name = state.scorer ? `${state.scorer} scores` : "scores";
    holder.replaceChildren(h("h3", { text: `${name} of kept and dropped examples (higher = harder)` }),
      histogram(`${state.version}: ${name}`, [{ name: "kept", values: pick(1), color: "#1f8a4c" }, { name: "dropped", values: pick(2), color: "#c23b3b" }], "score"));
  }
  function galleryControls() {
    const d = decoded(state.version);
    const kinds = [...new Set(d.meta.reasons.map(([k]) => k))].sort();
    const rounds = [...new Set(kinds.map(roundOf).filter((x) => x))].sort();
    const labels = [...new Set(Array.from(E.label).filter((x) => x >= 0))].sort((a, b) => a - b);
    const change = (field, parse) => (ev) => {
      state[field] = parse ? parse(ev.target) : ev.target.value;
      state.page = 0;
      if (field === "scorer") drawHistogram();
      drawGallery();
    };
    const select = (id, label, field, options) => h("label", {}, label, h("select", { id, onchange: change(field) },
      options.map(([value, text]) => h("option", { value, selected: String(state[field]) === String(value), text }))));
    return h("div", { class: "controls", id: "filters" },
      select("f-status", "status", "status", [["all", "all"], ["kept", "kept"], ["dropped", "dropped"], ["quarantined", "quarantined"]]),
      select("f-class", "class", "cls", [["", "all classes"], ...labels.map((l) => [String(l), className(l)])]),
      select("f-reason", "reason", "reason", [["", "all reasons"], ...kinds.map((k) => [k, k])]),
      select("f-round", "round", "round", [["", "any round"], ...rounds.map((r) => [r, r])]),
      h("label", {}, "score by", h("select", { id: "f-scorer", onchange: change("scorer") }, scorerOptions())),
      select("f-sort", "sort", "sort", [["desc", "score, highest first"], ["asc", "score, lowest first"], ["key", "key"]]),
      h("label", {}, "per page", h("select", { id: "f-size", onchange: change("pageSize", (t) => Number(t.value)) },
        PAGE_SIZES.map((p) => h("option", { value: p, selected: p === state.pageSize, text: p })))),
      h("label", { class: "check" }, h("input", { type: "checkbox", id: "f-thumbs", checked: state.onlyThumbs, onchange: change("onlyThumbs", (t) => t.checked) }), "only with thumbnails"));
  }
  function galleryMatches() {
    const d = decoded(state.version), scores = currentScores();
    const want = { all: 0, kept: 1, dropped: 2, quarantined: 3 }[state.status];
    const cls = state.cls === "" ? null : Number(state.cls);
    const reasonCodes = new Uint8Array(d.meta.reasons.length).fill(1);
    d.meta.reasons.forEach(([kind], c) => {
      if ((state.reason && kind !== state.reason) || (state.round && roundOf(kind) !== state.round)) reasonCodes[c] = 0;
    });
    const out = [];
    for (let i = 0; i < N; i += 1) {
      const st = d.status[i];
      if (!st || (want && st !== want) || !reasonCodes[d.code[i]]) continue;
      if (cls !== null && E.label[i] !== cls) continue;
      if (state.onlyThumbs && !hasThumb[i]) continue;
      if (state.scorer && scores && Number.isNaN(scores[i])) continue;  // a scorer chosen: the examples it scored
      out.push(i);
    }
    if (state.sort !== "key" && scores) {
      const sign = state.sort === "desc" ? -1 : 1;
      out.sort((a, b) => {
        const x = scores[a], y = scores[b];
        if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) - Number.isNaN(y) || a - b;
        return sign * (x - y) || a - b;
      });
    }
    return out;
  }
  function card(i, d, scores) {
    const st = STATUS[d.status[i]], reason = reasonOf(d, i);
    return h("div", { class: "card " + st, data: { key: E.key[i], status: st }, title: E.key[i], onclick: () => { location.hash = "example=" + encodeURIComponent(E.key[i]); } },
      thumb(i), h("div", { class: "key", text: E.key[i] }),
      h("div", { class: "line split" }, h("span", { class: "cls", title: "class", text: className(E.label[i]) }),
        h("span", { class: "score", title: "score", text: scores ? num(scores[i]) : "–" })),
      h("div", { class: "line" }, h("span", { class: "badge " + st, text: st === "kept" && reason === "kept" ? "kept" : reason })));
  }
  function drawGallery() {
    const matches = galleryMatches(), d = decoded(state.version), scores = currentScores();
    const pages = Math.max(1, Math.ceil(matches.length / state.pageSize));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * state.pageSize, slice = matches.slice(start, start + state.pageSize);
    const thumbs = matches.reduce((a, i) => a + hasThumb[i], 0);
    const pager = (id) => {
      const el = document.getElementById(id);
      el.replaceChildren(
        h("button", { class: "ghost", disabled: state.page === 0, onclick: () => { state.page -= 1; drawGallery(); } }, "‹ previous"),
        h("span", { id: id === "gallery-pager" ? "gallery-count" : null, data: { total: matches.length, page: state.page + 1, pages } },
          `${fmt(matches.length)} examples match · page ${state.page + 1} of ${fmt(pages)} · ${fmt(thumbs)} with thumbnails`),
        h("button", { class: "ghost", disabled: state.page >= pages - 1, onclick: () => { state.page += 1; drawGallery(); } }, "next ›"));
    };
    pager("gallery-pager");
    pager("gallery-pager-bottom");
    const gallery = document.getElementById("gallery");
    gallery.replaceChildren(...(slice.length ? slice.map((i) => card(i, d, scores)) : [empty("No example matches these filters.")]));
  }

  /* ---------- Example ---------- */
  function renderExample() {
    const root = document.getElementById("tab-example");
    const input = h("input", { type: "search", id: "key-input", placeholder: "an example's key, e.g. " + (E.key[0] || ""), value: state.key, autocomplete: "off", spellcheck: "false" });
    const go = () => { location.hash = "example=" + encodeURIComponent(input.value.trim()); };
    input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") go(); });
    input.addEventListener("input", () => suggest(input.value.trim()));
    root.append(h("div", { class: "search" }, input, h("button", { id: "key-go", onclick: go }, "Show")),
      h("div", { class: "suggest", id: "suggest" }), h("div", { id: "example-body" },
        empty("Search a key, or click any example in the gallery, a duplicate group or a comparison.")));
  }
  function suggest(prefix) {
    const box = document.getElementById("suggest");
    box.replaceChildren();
    if (!prefix) return;
    let i = findKey(prefix);
    if (i < 0) i = -i - 1;
    for (let n = 0; n < 12 && i < N && E.key[i].startsWith(prefix); n += 1, i += 1) box.append(keyLink(i));
  }
  function openExample(key) {
    if (!rendered.example) { rendered.example = true; renderExample(); }
    state.key = key;
    document.getElementById("key-input").value = key;
    const out = document.getElementById("example-body"), i = findKey(key);
    if (i < 0) {
      suggest(key);
      out.replaceChildren(h("p", { class: "error", id: "not-found", text: `no example with key ${key}` }));
      return;
    }
    document.getElementById("suggest").replaceChildren();
    const split = E.splits[E.split[i]], ok = E.ok[i] === 1;
    const facts = [["key", E.key[i]], ["split", split], ["class", `${className(E.label[i])} (label ${E.label[i] >= 0 ? E.label[i] : "–"})`],
      ["status", ok ? "ok" : "quarantined"], ...(ok ? [] : [["reason", E.quarantine[i]]]), ["source", E.source[i]],
      ["shard", E.shard[i] >= 0 ? E.shards[E.shard[i]] : "–"]];
    const scoreRows = R.scorers.map((x) => {
      const arr = scoreArray(x.ref);
      return h("tr", { data: { scorer: x.name } }, h("td", { text: x.name }), h("td", { text: x.scorer }),
        h("td", { class: "num", text: arr ? num(arr[i], 5) : "–" }));
    });
    const groups = Object.entries(SC.members).filter(([, m]) => m[i] !== undefined).map(([name, m]) => {
      const [group, size, rep, dist] = m[i];
      return h("tr", {}, h("td", { text: name }), h("td", { class: "num", text: group }), h("td", { class: "num", text: size }),
        h("td", {}, rep === i ? "this one" : keyLink(rep)), h("td", { class: "num", text: dist }));
    });
    const lineage = split === "train" ? versions.map((v) => {
      const d = decoded(v.version);
      if (!d.status[i]) return null;
      const reason = reasonOf(d, i), kind = d.meta.reasons[d.code[i]][0], kept = d.status[i] === 1;
      const arr = scoreArray(v.score);
      return h("tr", { data: { version: v.version, kept: kept ? "true" : "false", reason } },
        h("td", { class: "mono", text: v.version }), h("td", { text: v.round ?? "–" }), h("td", { text: v.parent || "–" }),
        h("td", {}, h("span", { class: "badge " + STATUS[d.status[i]], text: words(kind, kept) })),
        h("td", { class: "text mono", text: reason }), h("td", { class: "num", text: arr ? num(arr[i], 5) : "–" }));
    }).filter((x) => x) : [];
    const big = thumb(i, "big");
    out.replaceChildren(h("div", { class: "example", id: "example-panel", data: { key: E.key[i] } },
      h("div", {}, big, h("p", { class: "note", text: hasThumb[i] ? "thumbnail, upscaled without smoothing" : "" })),
      h("div", {},
        h("div", { class: "panel" }, table(["", ""], facts.map(([k, v]) => h("tr", {}, h("th", { text: k }), h("td", { class: "text", text: v }))), { id: "facts" })),
        h("h3", { text: "Scores" }),
        R.scorers.length ? h("div", { class: "panel" }, table(["file", "scorer", h("th", { class: "num", text: "score" })], scoreRows, { id: "key-scores" })) : empty("No scores/*.parquet in this dataset."),
        groups.length ? [h("h3", { text: "Duplicate groups" }), h("div", { class: "panel" }, table(["scores", "group", "size", "representative", "distance from it"], groups))] : [],
        h("h3", { text: "Lineage across every selection" }),
        split !== "train" ? empty(`A ${split} example: selections only ever choose among train examples.`)
          : lineage.length ? h("div", { class: "panel" }, table(["version", "round", "parent", "decision", "reason", h("th", { class: "num", text: "score" })], lineage, { id: "lineage" }))
            : empty("No selection yet."))));
  }

  /* ---------- Compare two selections ---------- */
  function renderDiff() {
    const root = document.getElementById("tab-diff");
    if (versions.length < 2) { root.append(empty("Comparing needs two selection versions.")); return; }
    const to = byVersion[state.version] ? state.version : versions[versions.length - 1].version;
    const at = versions.findIndex((v) => v.version === to);
    state.diffTo = to;
    state.diffFrom = byVersion[to].parent && byVersion[byVersion[to].parent] ? byVersion[to].parent : versions[Math.max(0, at - 1)].version;
    if (state.diffFrom === state.diffTo) state.diffFrom = versions[at === 0 ? 1 : 0].version;
    const pick = (id, field) => h("select", { id, onchange: (ev) => { state[field] = ev.target.value; drawDiff(); } },
      versions.map((v) => h("option", { value: v.version, selected: v.version === state[field], text: versionLabel(v.version) })));
    root.append(h("div", { class: "controls" }, h("label", {}, "from", pick("diff-from", "diffFrom")), h("label", {}, "to", pick("diff-to", "diffTo"))),
      h("div", { id: "diff-body" }));
    drawDiff();
  }
  function drawDiff() {
    const a = decoded(state.diffFrom), b = decoded(state.diffTo), out = document.getElementById("diff-body");
    const left = [], back = [];
    let keptA = 0, keptB = 0;
    for (let i = 0; i < N; i += 1) {
      const ka = a.status[i] === 1, kb = b.status[i] === 1;
      keptA += ka; keptB += kb;
      if (ka && !kb && b.status[i]) left.push(i);
      if (kb && !ka) back.push(i);
    }
    const scores = scoreArray(byVersion[state.diffTo].score);
    const section = (title, id, list, note) => {
      const reasons = {};
      list.forEach((i) => { const k = b.meta.reasons[b.code[i]][0]; reasons[k] = (reasons[k] || 0) + 1; });
      const row = (i) => h("tr", { data: { key: E.key[i] } }, h("td", {}, thumb(i, "small-thumb")), h("td", {}, keyLink(i)),
        h("td", { class: "text", text: className(E.label[i]) }),
        h("td", {}, h("span", { class: "badge " + STATUS[a.status[i]], text: a.status[i] ? reasonOf(a, i) : "not in " + state.diffFrom })),
        h("td", {}, h("span", { class: "badge " + STATUS[b.status[i]], text: reasonOf(b, i) })),
        h("td", { class: "num", text: scores ? num(scores[i]) : "–" }));
      return h("div", { id, data: { total: list.length } },
        h("h2", { text: `${title}: ${fmt(list.length)}` }), h("p", { class: "note", text: note }),
        h("div", { class: "chips" }, Object.entries(reasons).sort((x, y) => y[1] - x[1]).map(([k, n]) => h("span", { class: "badge plain", data: { reason: k, count: n }, text: `${k}: ${fmt(n)}` }))),
        list.length ? paged(["", "key", "class", `in ${state.diffFrom}`, `in ${state.diffTo}`, h("th", { class: "num", text: "score" })], list, row, 25) : empty("nobody"));
    };
    out.replaceChildren(
      h("div", { class: "cards" }, stat(`kept in ${state.diffFrom}`, fmt(keptA), "", { count: "kept-from" }), stat(`kept in ${state.diffTo}`, fmt(keptB), "", { count: "kept-to" }),
        stat("left", fmt(left.length), "dropped", { count: "left" }), stat("came back or joined", fmt(back.length), "kept", { count: "back" })),
      h("div", { class: "grid2" },
        section("Left", "diff-left", left, `kept in ${state.diffFrom}, dropped in ${state.diffTo}; why: the reason ${state.diffTo} gives`),
        section("Came back", "diff-back", back, `kept in ${state.diffTo}, not kept in ${state.diffFrom}`)));
  }

  /* ---------- Duplicates ---------- */
  function renderDuplicates() {
    const root = document.getElementById("tab-duplicates"), names = Object.keys(R.groups);
    if (!names.length) { root.append(empty("No grouping scores: make them with onion score DATASET exact (or phash).")); return; }
    names.forEach((name) => {
      const g = R.groups[name];
      root.append(h("h2", { text: `${name}: ${fmt(g.groups)} groups of copies` }),
        h("div", { class: "cards" }, stat("groups", fmt(g.groups)), stat("examples in them", fmt(g.examples)),
          stat("removable (all but one each)", fmt(g.removable), "dropped"), stat("largest group", fmt(g.largest))),
        h("p", { class: "note", text: `Largest first; the ${g.groups_shown} largest groups are listed, ${g.members_shown} members each, nearest the representative (outlined) first. Numbers: ${g.distance} from the representative.` }),
        h("div", { class: "groups", data: { scorer: name } }, g.listed.map((grp) => h("div", { class: "panel group", data: { group: grp.group, size: grp.size } },
          h("div", {}, h("strong", { text: `group ${grp.group}` }), ` · ${fmt(grp.size)} examples · representative `, keyLink(grp.representative)),
          h("div", { class: "group-members" }, grp.members.map(([i, dist]) => h("div", { class: "member" + (i === grp.representative ? " rep" : ""), title: E.key[i],
            onclick: () => { location.hash = "example=" + encodeURIComponent(E.key[i]); } }, thumb(i), h("div", { class: "mono", text: g.distance === "bits" ? `${dist} bits` : num(dist, 3) }))))))));
    });
  }

  /* ---------- Training runs and the bench ---------- */
  function renderTraining() {
    const root = document.getElementById("tab-training");
    if (!R.runs.length && !R.bench) { root.append(empty("No runs: add --run RUN (and --bench DIR) to onion report.")); return; }
    if (R.runs.length) {
      root.append(h("h2", { text: `Training runs: ${R.runs.length}` }));
      const rows = R.runs.map((r, k) => h("tr", {}, h("td", {}, h("i", { class: "swatch", data: { color: COLORS[k % COLORS.length] } }), h("span", { class: "mono", title: r.name, text: shortName(r.name) })),
        h("td", { class: "num", text: num(r.summary.val_top1) + (r.summary.val_top1_ema == null ? "" : ` (EMA ${num(r.summary.val_top1_ema)})`) }), h("td", { class: "num", text: num(r.summary.epochs) }),
        h("td", { class: "num", text: num(r.summary.images_per_second, 4) }), h("td", { class: "num", text: num(r.summary.train_seconds, 4) }),
        h("td", { text: r.examples }),
        h("td", { text: r.config.example_strategy || "–" }), h("td", { class: "num", text: num(r.config.token_keep) }), h("td", { class: "num", text: num(r.config.attn_keep) })));
      const n = (x) => h("th", { class: "num", text: x });
      const summary = h("div", { class: "panel" }, table(["run", n("val top-1"), n("epochs"), n("images/s"), n("train s"), "examples", "example pruning", n("token keep"), n("attention keep")], rows, { id: "runs" }));
      root.append(summary);
      paintSwatches(summary);
      const series = (column, dash, label) => R.runs.map((r, k) => ({ name: label, run: shortName(r.name), color: COLORS[k % COLORS.length], dash,
        xs: r.metrics.epoch || [], ys: r.metrics[column] || [] }));
      root.append(h("div", { class: "grid2" },
        lineChart("Loss", [...series("train_loss", "none", "train"), ...series("val_loss", "5 3", "val")], "epoch"),
        lineChart("Top-1 (%)", [...series("train_top1", "none", "train"), ...series("val_top1", "5 3", "val"), ...series("val_top1_ema", "1 3", "val, EMA").filter((x) => x.ys.length)], "epoch"),
        lineChart("Keep rates: examples, tokens, attention", [...series("example_keep", "none", "examples"), ...series("token_keep", "5 3", "tokens"), ...series("attn_keep", "1 3", "attention")], "epoch"),
        lineChart("Images per second", series("images_per_second", "none", "images/s"), "epoch")));
    }
    if (R.bench) {
      const b = R.bench;
      root.append(h("h2", { text: "Bench" }), h("p", { class: "note", text: b.title || b.name }));
      const pct = (x) => (x === undefined || x === null ? "–" : num(x, 4));
      const rows = b.arms.map((a) => h("tr", { data: { arm: a.arm } }, h("td", { class: "mono", text: a.arm }), h("td", { class: "num", text: num(a.seconds, 4) }),
        h("td", { class: "num", text: a.relative_time !== undefined ? num(a.relative_time, 3) + "x" : "–" }), h("td", { class: "num", text: num(a.images_per_second, 4) }),
        h("td", { class: "num", text: a.relative_flops !== undefined ? num(a.relative_flops, 3) + "x" : "–" }),
        h("td", { class: "num", text: `${pct(a.top1_mean)} ± ${pct(a.top1_std)}` }),
        h("td", { class: "num", text: a.paired_delta !== undefined ? `${num(a.paired_delta, 3)} [${num(a.paired_low, 3)}, ${num(a.paired_high, 3)}]` : "–" }),
        h("td", { text: a.verdict || "–" })));
      const n = (x) => h("th", { class: "num", text: x });
      root.append(h("div", { class: "panel" }, table(["arm", n("time (s)"), n("time vs dense"), n("images/s"), n("FLOPs vs dense"), n("top-1 (%)"), n("paired delta"), "parity"], rows, { id: "bench" })));
      if (b.plot) root.append(h("p", {}, h("img", { class: "bench-plot", src: "bench.png", alt: "bench: each arm's top-1 difference to dense against its time relative to dense" })));
    }
  }

  const RENDER = { dataset: renderDataset, selection: renderSelection, example: renderExample, diff: renderDiff,
    duplicates: renderDuplicates, training: renderTraining };

  /* ---------- start ---------- */
  document.title = "onion report · " + R.title;
  document.getElementById("title").textContent = R.title;
  document.getElementById("subtitle").textContent = `${R.dataset.dataset} · ${fmt(R.dataset.counts.total)} examples · ${versions.length} selection versions · ${R.scorers.length} score files`;
  const nav = document.getElementById("tabs");
  TABS.forEach(([id, label]) => {
    const count = { duplicates: Object.keys(R.groups).length, training: R.runs.length + (R.bench ? 1 : 0) }[id];
    nav.append(h("a", { href: "#" + id, class: count === 0 ? "dim" : null, title: count === 0 ? "nothing to show" : null, data: { tab: id }, text: label }));
  });
  const t = R.thumbnails;
  document.getElementById("footer").textContent = `onion report. Thumbnails: ${fmt(t.count)} of ${fmt(t.with_images)} stored images (${bytes(t.bytes)}; limits: ${fmt(t.limit_count)} thumbnails, ${bytes(t.limit_bytes)}, longest side ${t.side} px). ` +
    (t.count < t.with_images ? "Beyond the limits a deterministic sample is shown: the first gallery pages of each selection, quarantined inputs and duplicate groups first, then by a hash of the key. " : "") +
    "Everything here is read from files in this folder: no network.";
  window.addEventListener("hashchange", route);
  route();
  window.ONION_READY = true;
}());
