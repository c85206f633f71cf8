/* infotrace audit dashboard: vanilla JavaScript over the service's JSON API (no framework, no CDN).
 *
 * State lives in `state` and in the URL hash (so a view can be bookmarked); every view links to its raw
 * JSON. Results are rendered into #results as rows carrying data-id (the training example id), and
 * #results carries data-state ("loading", "ready", "error") plus data-mode / data-query / data-score /
 * data-direction / data-objective describing what it currently shows, so tests and scripts can wait on it.
 */
"use strict";

(function () {
  const SCORES = ["information_gain", "information_loss", "influence", "inner_product", "cosine"];
  const SCORE_LABEL = {
    information_gain: "information gain",
    information_loss: "information loss",
    influence: "influence",
    inner_product: "inner product",
    cosine: "cosine",
  };
  const SHOWN_SCORES = ["information_loss", "information_gain", "influence"];
  const SUBSET_PATH = "/v1/indexes/{name}/attributions/subset";

  const state = {
    indexes: [],
    index: null, // summary of the selected index
    source: "stored", // "stored" | "input" | "text"
    mode: "ranking", // "ranking" | "subset"
    subsetAvailable: false,
    seq: 0, // increases with every request; stale responses are dropped
    blobUrl: null,
  };

  // ---- small helpers ---------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  /** Create an element; `attrs` keys starting with "on" become listeners, "dataset" sets data-*. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Replace the children of `node`, skipping null, undefined and false (replaceChildren would print them). */
  function fill(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** A number for people: 4 significant digits, exponent notation when very large or small. */
  function fmt(x) {
    if (x === null || x === undefined) return "-";
    if (typeof x !== "number") return String(x);
    if (!Number.isFinite(x)) return String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return Number(x.toPrecision(4)).toString();
  }

  const enc = encodeURIComponent;
  const indexPath = (name) => `v1/indexes/${enc(name)}`;
  const imageShape = () => (state.index && state.index.model && state.index.model.image_shape) || null;
  const exampleJsonUrl = (id) => `${indexPath(state.index.name)}/examples/${id}`;
  const queryJsonUrl = (id) => `${indexPath(state.index.name)}/queries/${id}`;
  const exampleImageUrl = (id, scale) => `${exampleJsonUrl(id)}/image.png?scale=${scale}`;
  const queryImageUrl = (id, scale) => `${queryJsonUrl(id)}/image.png?scale=${scale}`;

  // With API keys on (INFOTRACE_API_KEYS), the service also accepts the key from the
  // `infotrace_api_key` cookie, so that images load too; ask for it once on a 401.
  async function fetchJson(url, options, retried) {
    const response = await fetch(url, options);
    if (response.status === 401 && !retried) {
      const key = window.prompt("This infotrace service needs an API key:");
      if (key) {
        document.cookie = `infotrace_api_key=${encodeURIComponent(key.trim())}; path=/; SameSite=Strict`;
        return fetchJson(url, options, true);
      }
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && body.detail !== undefined ? body.detail : response.statusText;
      const text = typeof detail === "string" ? detail : JSON.stringify(detail);
      throw new Error(`${response.status}: ${text}`);
    }
    return body;
  }

  function setStatus(kind, message) {
    const node = $("status");
    node.dataset.state = kind;
    node.textContent = message || "";
    document.body.dataset.state = kind;
  }

  // ---- URL hash state --------------------------------------------------------------------------------

  function readHash() {
    const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    return Object.fromEntries(params.entries());
  }

  function writeHash() {
    if (!state.index) return;
    const params = new URLSearchParams({ index: state.index.name, mode: state.mode });
    if (state.source === "stored") params.set("query", $("query-id").value);
    if (state.source === "text") {
      params.set("source", "text");
      params.set("text", $("query-text").value);
      if ($("query-continuation").value !== "") params.set("continuation", $("query-continuation").value);
      params.set("max_new_tokens", $("max-new-tokens").value);
    }
    if (state.mode === "ranking") {
      params.set("score", $("score-select").value);
      params.set("direction", $("direction-select").value);
      params.set("top_k", $("top-k").value);
    } else {
      params.set("objective", $("objective-select").value);
      params.set("size", $("subset-size").value);
      params.set("candidates", $("subset-candidates").value);
    }
    history.replaceState(null, "", `#${params.toString()}`);
  }

  function applyHash(hash) {
    const set = (id, value) => {
      if (value !== undefined && value !== "") $(id).value = value;
    };
    set("query-id", hash.query);
    if (SCORES.includes(hash.score)) set("score-select", hash.score);
    set("direction-select", hash.direction);
    set("top-k", hash.top_k);
    set("objective-select", hash.objective);
    set("subset-size", hash.size);
    set("subset-candidates", hash.candidates);
    if (hash.mode === "subset") setMode("subset", false);
    if (hash.source === "text" && state.index && state.index.text_queries) {
      $("query-text").value = hash.text ?? $("query-text").value;
      $("query-continuation").value = hash.continuation ?? "";
      set("max-new-tokens", hash.max_new_tokens);
      setSource("text", false);
    }
  }

  // ---- indexes ---------------------------------------------------------------------------------------

  async function loadIndexes() {
    const [list, openapi] = await Promise.all([
      fetchJson("v1/indexes"),
      fetchJson("openapi.json").catch(() => null),
    ]);
    state.subsetAvailable = Boolean(openapi && openapi.paths && openapi.paths[SUBSET_PATH]);
    $("mode-subset").hidden = !state.subsetAvailable;
    state.indexes = list.indexes;
    const select = $("index-select");
    select.replaceChildren(
      ...list.indexes.map((ix) =>
        el("option", { value: ix.name, disabled: !ix.ready }, ix.ready ? ix.name : `${ix.name} (not ready)`),
      ),
    );
    const hash = readHash();
    const ready = list.indexes.filter((ix) => ix.ready);
    if (!ready.length) {
      setStatus("error", "no index is ready; see GET /readyz");
      return;
    }
    const chosen = ready.find((ix) => ix.name === hash.index) || ready[0];
    select.value = chosen.name;
    selectIndex(chosen.name);
    applyHash(hash);
    await run();
  }

  function selectIndex(name) {
    state.index = state.indexes.find((ix) => ix.name === name) || null;
    if (!state.index) return;
    const ix = state.index;
    const shape = imageShape();
    $("index-summary").textContent =
      `${ix.n_train} training examples, ${ix.n_query} stored test examples, k = ${ix.k}` +
      (ix.model ? `, model with ${ix.model.n_params} parameters` : "") +
      (shape ? `, ${shape[0]} x ${shape[1]} images` : "");
    $("link-index").href = indexPath(ix.name);
    $("query-id").max = Math.max(ix.n_query - 1, 0);
    $("query-range").textContent = ix.n_query
      ? `ids 0 to ${ix.n_query - 1}`
      : "this index has no stored test examples; paste an input";
    const inputShape = ix.model ? JSON.stringify(ix.model.input_shape) : "?";
    $("input-hint").textContent = ix.raw_input_queries
      ? `expected shape ${inputShape}` + (shape ? "; an uploaded image is resized to " + shape.join(" x ") : "")
      : "this index was built without a model spec: raw inputs cannot be featurized";
    $("source-input").disabled = !ix.raw_input_queries;
    $("source-text").hidden = !ix.text_queries;
    if (!ix.raw_input_queries && state.source === "input") setSource("stored", false);
    if (!ix.text_queries && state.source === "text") setSource("stored", false);
    $("example-detail").hidden = true;
  }

  // ---- controls --------------------------------------------------------------------------------------

  function setSource(source, rerun = true) {
    state.source = source;
    for (const tab of document.querySelectorAll("[data-source]")) {
      tab.classList.toggle("active", tab.dataset.source === source);
    }
    $("stored-controls").hidden = source !== "stored";
    $("input-controls").hidden = source !== "input";
    $("text-controls").hidden = source !== "text";
    if (rerun && source === "stored") run();
  }

  function setMode(mode, rerun = true) {
    if (mode === "subset" && !state.subsetAvailable) return;
    state.mode = mode;
    for (const tab of document.querySelectorAll("[data-mode]")) {
      if (tab.classList.contains("tab")) tab.classList.toggle("active", tab.dataset.mode === mode);
    }
    $("ranking-controls").hidden = mode !== "ranking";
    $("subset-controls").hidden = mode !== "subset";
    if (rerun) run();
  }

  function intValue(id, fallback) {
    const value = Number.parseInt($(id).value, 10);
    return Number.isFinite(value) ? value : fallback;
  }

  function parseRawInput() {
    const text = $("raw-input").value.trim();
    if (!text) throw new Error("paste a JSON array (or upload a file) first");
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      throw new Error(`the input is not valid JSON: ${err.message}`);
    }
    if (!Array.isArray(value)) throw new Error("the input must be a JSON array");
    return value;
  }

  /** A target as typed: a number, or a JSON list of token ids (a language model's, -100 where not scored). */
  function parseTarget(text) {
    let value;
    try {
      value = JSON.parse(text);
    } catch (err) {
      throw new Error(`the target must be a number or a JSON list of token ids: ${err.message}`);
    }
    if (typeof value !== "number" && !Array.isArray(value)) {
      throw new Error("the target must be a number or a JSON list of token ids");
    }
    return value;
  }

  /** The query object of the request body, plus a GET URL when the query is a stored id. */
  function currentQuery() {
    if (state.source === "stored") {
      const id = intValue("query-id", 0);
      return { spec: { id }, storedId: id };
    }
    if (state.source === "text") {
      const text = $("query-text").value;
      if (!text.trim()) throw new Error("write a text first");
      const spec = { text, max_new_tokens: intValue("max-new-tokens", 16) };
      const continuation = $("query-continuation").value;
      if (continuation !== "") spec.continuation = continuation;
      return { spec, storedId: null };
    }
    const spec = { input: parseRawInput() };
    const target = $("raw-target").value.trim();
    if (target !== "") spec.target = parseTarget(target);
    return { spec, storedId: null };
  }

  // ---- running a view --------------------------------------------------------------------------------

  async function run() {
    if (!state.index) return;
    const seq = ++state.seq;
    const results = $("results");
    let query;
    try {
      query = currentQuery();
    } catch (err) {
      setStatus("error", err.message);
      results.dataset.state = "error";
      return;
    }
    writeHash();
    const name = state.index.name;
    let url;
    let getUrl;
    let body;
    const describe = { mode: state.mode, query: query.storedId === null ? state.source : String(query.storedId) };
    if (state.mode === "ranking") {
      const topK = intValue("top-k", 10);
      const score = $("score-select").value;
      const direction = $("direction-select").value;
      url = `${indexPath(name)}/attributions`;
      body = { query: query.spec, top_k: topK, score, direction };
      getUrl = `${url}?query_id=${query.storedId}&top_k=${topK}&score=${score}&direction=${direction}`;
      Object.assign(describe, { score, direction, topK: String(topK) });
    } else {
      const size = intValue("subset-size", 10);
      const objective = $("objective-select").value;
      const candidates = intValue("subset-candidates", 200);
      url = `${indexPath(name)}/attributions/subset`;
      body = { query: query.spec, size, objective, candidates };
      getUrl = `${url}?query_id=${query.storedId}&size=${size}&objective=${objective}&candidates=${candidates}`;
      Object.assign(describe, { objective, size: String(size) });
    }
    results.dataset.state = "loading";
    setStatus("loading", "computing...");
    let response;
    try {
      response = await fetchJson(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (err) {
      if (seq !== state.seq) return;
      results.dataset.state = "error";
      setStatus("error", err.message);
      return;
    }
    if (seq !== state.seq) return; // a newer request superseded this one
    setRawLink(query.storedId === null ? null : getUrl, response, body);
    renderQuery(response.query, query);
    if (state.mode === "ranking") renderRanking(response);
    else renderSubset(response);
    for (const key of ["score", "direction", "objective", "topK", "size"]) delete results.dataset[key];
    Object.assign(results.dataset, describe, { index: name, state: "ready" });
    const t = response.timings;
    setStatus("ready", `done: ${fmt(t.total_ms)} ms on the server (featurize ${fmt(t.featurize_ms)}, ` +
      `retrieve ${fmt(t.retrieve_ms)}, rerank ${fmt(t.rerank_ms)} ms)`);
  }

  function setRawLink(getUrl, response, body) {
    const link = $("raw-json-link");
    if (state.blobUrl) URL.revokeObjectURL(state.blobUrl);
    state.blobUrl = null;
    if (getUrl) {
      link.href = getUrl;
      link.textContent = "raw JSON of this view";
      $("raw-json-note").textContent = `(GET ${getUrl}; the POST with the same query answers the same)`;
    } else {
      // a raw input has no GET form: link to the JSON that the POST returned
      const blob = new Blob([JSON.stringify(response, null, 2)], { type: "application/json" });
      state.blobUrl = URL.createObjectURL(blob);
      link.href = state.blobUrl;
      link.textContent = "raw JSON of this view";
      $("raw-json-note").textContent = `(the POST response; body: {"query": {"${state.source}": ...}, ` +
        `${JSON.stringify({ ...body, query: undefined }).slice(1, -1)}})`;
    }
  }

  // ---- rendering: query ------------------------------------------------------------------------------

  /** Draw a raw input on a canvas with the server's scaling ([0, 1] as is, else min-max). */
  function inputCanvas(values, shape, scale) {
    const [h, w] = shape;
    const flat = values.flat(Infinity).map(Number);
    const canvas = el("canvas", { width: w * scale, height: h * scale, class: "digit" });
    if (flat.length !== h * w) return canvas;
    const lo = Math.min(...flat);
    const hi = Math.max(...flat);
    const unit = lo >= 0 && hi <= 1;
    const ctx = canvas.getContext("2d");
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) {
        const x = flat[r * w + c];
        const g = Math.round(255 * (unit ? x : hi > lo ? (x - lo) / (hi - lo) : 0));
        ctx.fillStyle = `rgb(${g},${g},${g})`;
        ctx.fillRect(c * scale, r * scale, scale, scale);
      }
    }
    return canvas;
  }

  function probabilityBars(probabilities, highlight) {
    if (!probabilities) return null;
    const width = 220;
    const rowH = 14;
    const node = svg("svg", {
      width,
      height: probabilities.length * rowH,
      class: "probs",
      role: "img",
      "aria-label": "predicted class probabilities",
    });
    probabilities.forEach((p, k) => {
      const y = k * rowH;
      node.append(
        svg("text", { x: 0, y: y + 11, class: "axis" }, String(k)),
        svg("rect", {
          x: 18, y: y + 2, height: rowH - 4, width: Math.max(p * (width - 70), 0.5),
          class: k === highlight ? "bar pos" : "bar muted-bar",
        }),
        svg("text", { x: 22 + p * (width - 70), y: y + 11, class: "axis" }, fmt(p)),
      );
    });
    return node;
  }

  function renderQuery(q, query) {
    const box = $("query-info");
    const shape = imageShape();
    let picture = null;
    if (shape && query.storedId !== null) {
      picture = el("img", {
        src: queryImageUrl(query.storedId, 5), width: shape[1] * 5, height: shape[0] * 5,
        alt: `test example ${query.storedId}`, class: "digit", id: "query-image",
      });
    } else if (shape && query.spec.input) {
      picture = inputCanvas(query.spec.input, shape, 5);
    }
    const passage = q.kind === "text"
      ? el("p", { class: "query-text", id: "query-passage" }, q.text,
        el("mark", { title: `continuation (${q.continuation_source})` }, q.continuation))
      : q.metadata && typeof q.metadata.text === "string"
        ? el("p", { class: "query-text", id: "query-passage" }, q.metadata.text)
        : null;
    const rows = [
      ["kind", q.kind + (q.id !== null && q.id !== undefined ? ` (id ${q.id})` : "")],
      ...(q.kind === "text" ? [["continuation", `${q.continuation_source}: ${JSON.stringify(q.continuation)}`]] : []),
      ["label", shortLabel(q.label)],
      ["explained target", shortLabel(q.target)],
      ["prediction", shortLabel(q.prediction)],
      ["output (margin)", fmt(q.output)],
      ["posterior variance v_q", fmt(q.posterior_variance)],
      ["predictive entropy", q.predictive_entropy === null ? "-" : `${fmt(q.predictive_entropy)} nats`],
      ["output entropy", `${fmt(q.output_entropy)} nats`],
    ];
    const table = el("table", { class: "kv", id: "query-table" },
      rows.map(([k, v]) => el("tr", { dataset: { key: k } }, el("th", {}, k), el("td", {}, v ?? "-"))));
    const links = el("p", { class: "links" },
      query.storedId !== null
        ? el("a", { href: queryJsonUrl(query.storedId), target: "_blank", rel: "noopener" }, "query JSON")
        : null);
    const mismatch = !Array.isArray(q.label) && q.label !== null && q.prediction !== null &&
      q.label !== undefined && q.label !== q.prediction;
    fill(box,
      el("h2", {}, "The model on this query"),
      passage,
      el("div", { class: "query-card" }, picture, el("div", {}, table, links)),
      mismatch ? el("p", { class: "warn" }, `misclassified: label ${q.label}, predicted ${q.prediction}`) : null,
      q.probabilities ? el("h3", {}, "predicted probabilities") : null,
      probabilityBars(q.probabilities, q.prediction),
    );
  }

  // ---- rendering: results ----------------------------------------------------------------------------

  function thumbnail(id, metadata) {
    const shape = imageShape();
    if (shape) {
      return el("img", {
        src: exampleImageUrl(id, 2), width: shape[1] * 2, height: shape[0] * 2,
        alt: `training example ${id}`, class: "digit", loading: "lazy",
      });
    }
    // not an image dataset: show the example's text (or its metadata) instead
    const text = metadata && (metadata.text || metadata.caption || metadata.title);
    const shown = text ? String(text) : JSON.stringify(metadata || {});
    return el("span", { class: "example-text", title: shown }, shown.length > 120 ? `${shown.slice(0, 117)}...` : shown);
  }

  /** A label, target or prediction for a table cell: a language model's token ids are counted, not listed. */
  function shortLabel(value) {
    if (value === null || value === undefined) return "-";
    if (!Array.isArray(value)) return value;
    return `${value.filter((t) => t !== -100).length} tokens`;
  }

  function signBadge(sign) {
    if (sign > 0) return el("span", { class: "badge pos" }, "proponent");
    if (sign < 0) return el("span", { class: "badge neg" }, "opponent");
    return el("span", { class: "badge" }, "neither");
  }

  /** Horizontal bar chart (inline SVG): one bar per row, signed values around a zero axis. */
  function barChart(items, title, unit) {
    const width = 640;
    const rowH = 20;
    const labelW = 70;
    const valueW = 80;
    const height = items.length * rowH + 28;
    const values = items.map((it) => it.value);
    const maxAbs = Math.max(...values.map(Math.abs), 1e-300);
    const hasNeg = values.some((v) => v < 0);
    const hasPos = values.some((v) => v > 0);
    const plotW = width - labelW - valueW;
    const zeroX = labelW + (hasNeg && hasPos ? plotW / 2 : hasNeg ? plotW : 0);
    const span = hasNeg && hasPos ? plotW / 2 : plotW;
    const node = svg("svg", {
      width, height, viewBox: `0 0 ${width} ${height}`, role: "img", id: "bar-chart", "aria-label": title,
    });
    node.append(svg("text", { x: 0, y: 14, class: "chart-title" }, `${title}${unit ? ` (${unit})` : ""}`));
    items.forEach((it, r) => {
      const y = 24 + r * rowH;
      const w = (Math.abs(it.value) / maxAbs) * span;
      const x = it.value >= 0 ? zeroX : zeroX - w;
      const bar = svg("rect", {
        x, y: y + 3, width: Math.max(w, 0.5), height: rowH - 6,
        class: it.value > 0 ? "bar pos" : it.value < 0 ? "bar neg" : "bar",
        "data-id": it.id,
      });
      bar.append(svg("title", {}, `${it.label}: ${fmt(it.value)}`));
      node.append(
        svg("text", { x: 0, y: y + 14, class: "axis" }, it.label),
        bar,
        svg("text", { x: width - valueW + 6, y: y + 14, class: "axis value" }, fmt(it.value)),
      );
    });
    node.append(svg("line", { x1: zeroX, x2: zeroX, y1: 20, y2: height, class: "zero" }));
    return node;
  }

  function scoreCell(value, highlighted) {
    return el("td", { class: highlighted ? "num hl" : "num" }, fmt(value));
  }

  function renderRanking(response) {
    const score = response.score;
    const extra = SHOWN_SCORES.includes(score) ? [] : [score];
    const columns = [...SHOWN_SCORES, ...extra];
    const head = el("tr", {},
      el("th", {}, "rank"), el("th", {}, "example"), el("th", {}, "id"), el("th", {}, "label"),
      el("th", {}, "prediction"), el("th", {}, "role"),
      columns.map((s) => el("th", { class: s === score ? "num hl" : "num" }, SCORE_LABEL[s])),
      el("th", {}, ""));
    const rows = response.results.map((r) =>
      el("tr", {
        class: "result-row", dataset: { id: String(r.id), rank: String(r.rank), sign: String(r.sign) },
        onclick: () => showExample(r.id),
      },
      el("td", { class: "num" }, r.rank),
      el("td", {}, thumbnail(r.id, r.metadata)),
      el("td", { class: "num id" }, r.id),
      el("td", { class: "num" }, shortLabel(r.label)),
      el("td", { class: !Array.isArray(r.label) && r.label !== null && r.label !== r.prediction ? "num warn" : "num" },
        shortLabel(r.prediction)),
      el("td", {}, signBadge(r.sign)),
      columns.map((s) => scoreCell(r.scores[s], s === score)),
      el("td", {}, el("a", {
        href: exampleJsonUrl(r.id), target: "_blank", rel: "noopener", onclick: (e) => e.stopPropagation(),
      }, "JSON"))));
    const nPos = response.results.filter((r) => r.sign > 0).length;
    $("summary").replaceChildren(el("p", {},
      `top ${response.results.length} by ${SCORE_LABEL[score]}, direction ${response.direction}: ` +
      `${nPos} proponents, ${response.results.length - nPos} opponents; ` +
      `${response.candidates_searched} candidates searched per FAISS search` +
      (response.exact ? ", exact (equals the brute-force top-k)" : "")));
    const unit = score === "information_gain" || score === "information_loss" ? "nats, with the sign of influence" : "";
    $("chart").replaceChildren(response.results.length
      ? barChart(response.results.map((r) => ({ id: r.id, label: `#${r.id}`, value: r.signed_score })),
        `signed ${SCORE_LABEL[score]}`, unit)
      : el("p", { class: "muted" }, "no training example has the requested sign"));
    $("results").replaceChildren(el("table", { class: "results", id: "results-table" },
      el("thead", {}, head), el("tbody", {}, rows)));
  }

  function renderSubset(response) {
    const head = el("tr", {},
      el("th", {}, "step"), el("th", {}, "example"), el("th", {}, "id"), el("th", {}, "label"),
      el("th", { class: "num hl" }, "marginal gain"), el("th", { class: "num" }, "joint"),
      SHOWN_SCORES.map((s) => el("th", { class: "num" }, SCORE_LABEL[s])), el("th", {}, ""));
    const rows = response.members.map((m) =>
      el("tr", {
        class: "result-row", dataset: { id: String(m.id), step: String(m.step) },
        onclick: () => showExample(m.id),
      },
      el("td", { class: "num" }, m.step),
      el("td", {}, thumbnail(m.id, m.metadata)),
      el("td", { class: "num id" }, m.id),
      el("td", { class: "num" }, shortLabel(m.label)),
      scoreCell(m.marginal_gain, true),
      scoreCell(m.joint, false),
      SHOWN_SCORES.map((s) => scoreCell(m.scores[s], false)),
      el("td", {}, el("a", {
        href: exampleJsonUrl(m.id), target: "_blank", rel: "noopener", onclick: (e) => e.stopPropagation(),
      }, "JSON"))));
    const gain = response.joint - response.top_single_joint;
    $("summary").replaceChildren(
      el("p", { id: "subset-summary" },
        `greedy set of ${response.members.length} by joint ${SCORE_LABEL[response.objective]} ` +
        `from ${response.candidates} candidates: joint `,
        el("strong", { id: "subset-joint" }, `${fmt(response.joint)} nats`),
        " vs ",
        el("strong", { id: "subset-top-single" }, `${fmt(response.top_single_joint)} nats`),
        ` for the top-${response.members.length} single-example set ` +
        (Math.abs(gain) <= 1e-9 * Math.abs(response.joint)
          ? "(the same: here the greedy set adds nothing over the top single examples)"
          : `(${gain >= 0 ? "+" : ""}${fmt(gain)} nats)`)));
    $("chart").replaceChildren(barChart(
      response.members.map((m) => ({ id: m.id, label: `${m.step}. #${m.id}`, value: m.marginal_gain })),
      "marginal gain per greedy step", "nats"));
    $("results").replaceChildren(el("table", { class: "results", id: "results-table" },
      el("thead", {}, head), el("tbody", {}, rows)));
  }

  // ---- one training example --------------------------------------------------------------------------

  async function showExample(id) {
    const box = $("example-detail");
    box.hidden = false;
    fill(box, el("h2", {}, `Training example ${id}`), el("p", { class: "muted" }, "loading..."));
    let info;
    try {
      info = await fetchJson(exampleJsonUrl(id));
    } catch (err) {
      fill(box, el("h2", {}, `Training example ${id}`), el("p", { class: "warn" }, err.message));
      return;
    }
    const shape = imageShape();
    const picture = shape
      ? el("img", { src: exampleImageUrl(id, 5), width: shape[1] * 5, height: shape[0] * 5, class: "digit", alt: "" })
      : null;
    const rows = [
      ["label", shortLabel(info.label)], ["prediction", shortLabel(info.prediction)],
      ["output (margin)", fmt(info.output)],
      ["posterior variance h_i", fmt(info.posterior_variance)],
      ...Object.entries(info.metadata).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]),
    ];
    const explain = state.index.raw_input_queries
      ? el("button", { type: "button", onclick: () => explainTraining(id) }, "explain this example's prediction")
      : null;
    fill(box,
      el("h2", {}, `Training example ${id}`),
      el("div", { class: "query-card" }, picture,
        el("table", { class: "kv" }, rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v ?? "-"))))),
      probabilityBars(info.probabilities, info.prediction),
      el("p", { class: "links" },
        el("a", { href: exampleJsonUrl(id), target: "_blank", rel: "noopener" }, "example JSON"),
        picture ? el("a", { href: exampleImageUrl(id, 8), target: "_blank", rel: "noopener" }, "PNG") : null),
      explain);
  }

  async function explainTraining(id) {
    try {
      const info = await fetchJson(`${exampleJsonUrl(id)}?include_input=true`);
      $("raw-input").value = JSON.stringify(info.input);
      $("raw-target").value = "";
      setSource("input", false);
      await run();
    } catch (err) {
      setStatus("error", err.message);
    }
  }

  // ---- raw input: paste or upload ----------------------------------------------------------------------

  async function copyStoredInput() {
    try {
      const id = intValue("query-id", 0);
      const info = await fetchJson(`${queryJsonUrl(id)}?include_input=true`);
      $("raw-input").value = JSON.stringify(info.input);
      $("raw-target").value = info.label === null || info.label === undefined ? "" : JSON.stringify(info.label);
    } catch (err) {
      setStatus("error", err.message);
    }
  }

  function imageToInput(file) {
    const shape = imageShape();
    return new Promise((resolve, reject) => {
      if (!shape) {
        reject(new Error("this index's inputs are not images: upload a JSON array"));
        return;
      }
      const url = URL.createObjectURL(file);
      const img = new Image();
      img.onload = () => {
        const [h, w] = shape;
        const canvas = el("canvas", { width: w, height: h });
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0, w, h);
        const rgba = ctx.getImageData(0, 0, w, h).data;
        const invert = $("raw-invert").checked;
        const values = [];
        for (let i = 0; i < w * h; i++) {
          const gray = (rgba[4 * i] + rgba[4 * i + 1] + rgba[4 * i + 2]) / (3 * 255);
          const v = invert ? 1 - gray : gray;
          values.push(Math.round(v * 1000) / 1000);
        }
        URL.revokeObjectURL(url);
        // the model takes the shape in the manifest (e.g. a flat 784), not necessarily (h, w)
        resolve(values);
      };
      img.onerror = () => {
        URL.revokeObjectURL(url);
        reject(new Error("the file could not be read as an image"));
      };
      img.src = url;
    });
  }

  async function onFile(event) {
    const file = event.target.files && event.target.files[0];
    if (!file) return;
    try {
      if (file.type.startsWith("image/")) {
        $("raw-input").value = JSON.stringify(await imageToInput(file));
      } else {
        $("raw-input").value = await file.text();
      }
      setStatus("idle", `loaded ${file.name}; press explain`);
    } catch (err) {
      setStatus("error", err.message);
    }
  }

  // ---- wiring ------------------------------------------------------------------------------------------

  function stepQuery(delta) {
    const n = state.index ? state.index.n_query : 0;
    if (!n) return;
    const id = (intValue("query-id", 0) + delta + n) % n;
    $("query-id").value = id;
    setSource("stored", false);
    run();
  }

  function init() {
    $("index-select").addEventListener("change", (e) => {
      selectIndex(e.target.value);
      $("query-id").value = 0;
      run();
    });
    for (const tab of document.querySelectorAll("[data-source]")) {
      tab.addEventListener("click", () => setSource(tab.dataset.source));
    }
    for (const tab of document.querySelectorAll(".tab[data-mode]")) {
      tab.addEventListener("click", () => setMode(tab.dataset.mode));
    }
    $("query-id").addEventListener("change", () => run());
    $("prev-query").addEventListener("click", () => stepQuery(-1));
    $("next-query").addEventListener("click", () => stepQuery(1));
    $("random-query").addEventListener("click", () => {
      const n = state.index ? state.index.n_query : 0;
      if (n) stepQuery(Math.floor(Math.random() * n));
    });
    for (const id of ["score-select", "direction-select", "top-k", "objective-select", "subset-size",
      "subset-candidates"]) {
      $(id).addEventListener("change", () => run());
    }
    $("run-button").addEventListener("click", () => run());
    $("query-text").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        run();
      }
    });
    $("raw-file").addEventListener("change", onFile);
    $("copy-stored-input").addEventListener("click", copyStoredInput);
    loadIndexes().catch((err) => setStatus("error", `could not list the indexes: ${err.message}`));
  }

  document.addEventListener("DOMContentLoaded", init);
})();
