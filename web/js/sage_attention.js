// Sage Attention Pack frontend: the compare report on the "Sage Attention Compare" node (before/after slider over
// the two outputs, the measured figures under them) and the counters of the "Sage Attention" patch node after a run.
//
// Data arrives two ways, both handled by the same code: the compare node's UI output ("executed" message,
// key "sage_compare") and the websocket events the nodes send ("sage_attention.compare", "sage_attention.stats").
// ComfyUI serves this file at /extensions/<pack folder>/js/, so its own scripts are three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "sage_attention_pack.compare_report";
const COMPARE_NODE = "SageAttentionCompare";
const PATCH_NODE = "SageAttention";
const COMPARE_WIDGET = "sage_compare_report";
const STATS_WIDGET = "sage_attention_counters";

function loadStylesheet() {
    const id = "sage-attention-pack-css";
    if (document.getElementById(id)) return;
    const link = document.createElement("link");
    link.id = id;
    link.rel = "stylesheet";
    link.href = new URL("../css/sage_attention.css", import.meta.url).href;
    document.head.appendChild(link);
}

function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
}

// ---------------------------------------------------------------------------------------------------------------
// Number formatting. Non-finite values travel as strings ("inf", "-inf", "nan") because JSON has no infinity.

function num(v) {
    if (typeof v === "number") return v;
    if (v === "inf") return Infinity;
    if (v === "-inf") return -Infinity;
    if (v === "nan") return NaN;
    return v == null ? NaN : Number(v);
}

export function formatSeconds(v) {
    const x = num(v);
    if (!Number.isFinite(x)) return "–";
    return x >= 10 ? `${x.toFixed(2)} s` : x >= 0.1 ? `${x.toFixed(3)} s` : `${(x * 1000).toFixed(2)} ms`;
}

export function formatRatio(v) {
    const x = num(v);
    if (!Number.isFinite(x)) return "–";
    return x >= 0.1 ? `${x.toFixed(2)}×` : `${x.toPrecision(2)}×`;
}

export function formatPsnr(v) {
    const x = num(v);
    if (x === Infinity) return "∞ dB (identical)";
    return Number.isFinite(x) ? `${x.toFixed(2)} dB` : "–";
}

export function formatFixed(v, digits) {
    const x = num(v);
    return Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function rawValue(v) {
    return typeof v === "number" ? String(v) : v == null ? "" : String(v);
}

// ---------------------------------------------------------------------------------------------------------------
// Images

function viewUrl(image) {
    if (!image) return "";
    const params = new URLSearchParams({
        filename: image.filename,
        subfolder: image.subfolder ?? "",
        type: image.type ?? "temp",
    });
    const preview = app.getPreviewFormatParam?.() ?? "";
    const rand = app.getRandParam?.() ?? `&rand=${Math.random()}`;
    return api.apiURL(`/view?${params.toString()}${preview}${rand}`);
}

// ---------------------------------------------------------------------------------------------------------------
// Compare widget

function figureRows(report) {
    const exact = report.exact ?? {};
    const sage = report.sage ?? {};
    const counters = sage.counters ?? {};
    const fallbacks = counters.fallback ?? {};
    const fallbackTotal = Object.values(fallbacks).reduce((a, b) => a + (Number(b) || 0), 0);
    const reasons = Object.entries(fallbacks).map(([k, n]) => `${k}: ${n}`).join(", ");
    const variants = Object.entries(counters.sage ?? {}).map(([k, n]) => `${k}: ${n}`).join(", ");
    const rows = [
        ["sampling_exact", "Sampling, exact", exact.sampling_s, formatSeconds(exact.sampling_s)],
        ["sampling_sage", "Sampling, Sage", sage.sampling_s, formatSeconds(sage.sampling_s)],
        ["speedup", "Speed-up", report.speedup, formatRatio(report.speedup)],
        ["attention_exact", "Attention, exact", exact.attention_s,
            `${formatSeconds(exact.attention_s)} (${exact.attention_calls ?? 0} calls)`],
        ["attention_sage", "Attention, Sage", sage.attention_s,
            `${formatSeconds(sage.attention_s)} (${sage.attention_calls ?? 0} calls)`],
        ["attention_speedup", "Attention speed-up", report.attention_speedup, formatRatio(report.attention_speedup)],
        ["psnr", "PSNR", report.psnr, formatPsnr(report.psnr)],
        ["ssim", "SSIM", report.ssim, formatFixed(report.ssim, 4)],
        ["max_diff_8bit", "Largest pixel difference", report.max_diff_8bit,
            `${report.max_diff_8bit ?? "–"} / 255 (${formatFixed(report.max_abs_diff, 4)})`],
        ["latent_cosine", "Latent cosine similarity", report.latent_cosine, formatFixed(report.latent_cosine, 6)],
    ];
    if (counters.total !== undefined || variants) {
        const sageTotal = Object.values(counters.sage ?? {}).reduce((a, b) => a + (Number(b) || 0), 0);
        rows.push(["sage_calls", "Calls served by Sage", sageTotal,
            variants ? `${sageTotal} (${variants})` : String(sageTotal)]);
        const exactCalls = counters.exact ?? {};
        const exactTotal = Object.values(exactCalls).reduce((a, b) => a + (Number(b) || 0), 0);
        const why = Object.entries(exactCalls).map(([k, n]) => `${k}: ${n}`).join(", ");
        rows.push(["kept_exact", "Kept exact", exactTotal, why ? `${exactTotal} (${why})` : "0"]);
        rows.push(["fallbacks", "Fallbacks", fallbackTotal, reasons ? `${fallbackTotal} (${reasons})` : "0"]);
    }
    return rows;
}

function buildFigures(report) {
    const table = el("table", "sage-compare-figures");
    const body = el("tbody");
    for (const [key, label, value, text] of figureRows(report)) {
        const tr = el("tr");
        tr.dataset.key = key;
        tr.append(el("th", "", label));
        const td = el("td", "", text);
        td.dataset.value = rawValue(value);
        tr.append(td);
        body.append(tr);
    }
    table.append(body);
    return table;
}

function buildFrameTable(report) {
    const frames = report.frames ?? [];
    if (frames.length < 2) return null;
    const details = el("details", "sage-compare-frames-table");
    details.append(el("summary", "", `Per frame (${frames.length})`));
    const table = el("table");
    const head = el("tr");
    for (const h of ["frame", "PSNR", "SSIM", "max diff"]) head.append(el("th", "", h));
    table.append(head);
    for (const f of frames) {
        const tr = el("tr");
        tr.dataset.frame = String(f.frame);
        tr.append(el("td", "", String(f.frame)));
        tr.append(el("td", "", formatPsnr(f.psnr)));
        tr.append(el("td", "", formatFixed(f.ssim, 4)));
        tr.append(el("td", "", `${f.max_diff_8bit}/255`));
        table.append(tr);
    }
    details.append(table);
    return details;
}

export function createCompareView(report, onLayout) {
    const root = el("div", "sage-compare");
    root.dataset.node = String(report.node ?? "");

    const stage = el("div", "sage-compare-stage");
    const after = el("img", "sage-compare-img sage-compare-after");
    const before = el("img", "sage-compare-img sage-compare-before");
    after.alt = "Sage";
    before.alt = "exact";
    after.draggable = false;
    before.draggable = false;
    const handle = el("div", "sage-compare-handle");
    handle.setAttribute("role", "slider");
    handle.setAttribute("aria-label", "before/after position");
    handle.setAttribute("aria-valuemin", "0");
    handle.setAttribute("aria-valuemax", "100");
    handle.tabIndex = 0;
    const tagBefore = el("span", "sage-compare-tag sage-compare-tag-before", report.labels?.exact ?? "Exact");
    const tagAfter = el("span", "sage-compare-tag sage-compare-tag-after", report.labels?.sage ?? "Sage");
    stage.append(after, before, handle, tagBefore, tagAfter);
    root.append(stage);

    const images = report.images ?? {};
    const exactImages = images.exact ?? [];
    const sageImages = images.sage ?? [];
    const frameIndices = images.frames ?? exactImages.map((_, i) => i);

    let position = 50;
    function setPosition(p) {
        position = Math.max(0, Math.min(100, p));
        before.style.clipPath = `inset(0 ${100 - position}% 0 0)`;
        handle.style.left = `${position}%`;
        handle.setAttribute("aria-valuenow", position.toFixed(1));
        root.dataset.position = position.toFixed(1);
    }
    function setFrame(i) {
        before.src = viewUrl(exactImages[i]);
        after.src = viewUrl(sageImages[i]);
        root.dataset.frame = String(frameIndices[i] ?? i);
    }
    function onLoad() {
        if (before.naturalWidth && before.naturalHeight) {
            stage.style.aspectRatio = `${before.naturalWidth} / ${before.naturalHeight}`;
            root.dataset.loaded = "true";
            onLayout?.();
        }
    }
    before.addEventListener("load", onLoad);

    let dragging = false;
    function fromEvent(e) {
        const r = stage.getBoundingClientRect();
        if (r.width > 0) setPosition(((e.clientX - r.left) / r.width) * 100);
    }
    stage.addEventListener("pointerdown", (e) => {
        dragging = true;
        stage.setPointerCapture?.(e.pointerId);
        fromEvent(e);
        e.preventDefault();
        e.stopPropagation();
    });
    stage.addEventListener("pointermove", (e) => {
        if (!dragging) return;
        fromEvent(e);
        e.preventDefault();
        e.stopPropagation();
    });
    const stop = (e) => {
        dragging = false;
        stage.releasePointerCapture?.(e.pointerId);
    };
    stage.addEventListener("pointerup", stop);
    stage.addEventListener("pointercancel", stop);
    handle.addEventListener("keydown", (e) => {
        const stepSize = e.shiftKey ? 10 : 2;
        if (e.key === "ArrowLeft") setPosition(position - stepSize);
        else if (e.key === "ArrowRight") setPosition(position + stepSize);
        else return;
        e.preventDefault();
        e.stopPropagation();
    });

    if (exactImages.length > 1) {
        const picker = el("div", "sage-compare-frame-picker");
        const range = el("input");
        range.type = "range";
        range.min = "0";
        range.max = String(exactImages.length - 1);
        range.value = "0";
        const label = el("span", "", `frame ${frameIndices[0] ?? 0}`);
        range.addEventListener("input", () => {
            const i = Number(range.value);
            setFrame(i);
            label.textContent = `frame ${frameIndices[i] ?? i}`;
        });
        range.addEventListener("pointerdown", (e) => e.stopPropagation());
        picker.append(label, range);
        root.append(picker);
    }

    root.append(buildFigures(report));
    const frameTable = buildFrameTable(report);
    if (frameTable) root.append(frameTable);
    if (report.timing_note) root.append(el("div", "sage-compare-note", report.timing_note));

    setPosition(50);
    if (exactImages.length) setFrame(0);
    root.sageSetPosition = setPosition;
    return root;
}

// A DOM widget is drawn with `margin` pixels above and below its element.
const WIDGET_MARGIN = 4;

function contentHeight(host) {
    const view = host.firstElementChild;
    return (view ? view.offsetHeight : host.scrollHeight || 0) + 2 * WIDGET_MARGIN;
}

// Grow the node so a DOM widget's whole content shows (its minimum height is the content's height).
function fitNode(node, minWidth) {
    requestAnimationFrame(() => {
        const size = node.computeSize?.() ?? node.size;
        const width = Math.max(node.size?.[0] ?? 0, size[0], minWidth ?? 0);
        node.setSize?.([width, Math.max(node.size?.[1] ?? 0, size[1])]);
        node.setDirtyCanvas?.(true, true);
    });
}

// Shows `content` in the node's DOM widget `name`, made on first use: never serialised, at least `minHeight` px.
function showInDomWidget(node, name, type, hostClass, minHeight, content) {
    let widget = node.widgets?.find((w) => w.name === name);
    if (!widget) {
        const host = el("div", hostClass);
        widget = node.addDOMWidget(name, type, host, {
            serialize: false,
            hideOnZoom: false,
            margin: WIDGET_MARGIN,
            getMinHeight: () => Math.max(minHeight, contentHeight(host)),
        });
        widget.serialize = false;
    }
    widget.element.replaceChildren(content);
    return widget;
}

function showCompare(node, report) {
    if (!node || !report) return;
    const view = createCompareView(report, () => fitNode(node, 360));
    showInDomWidget(node, COMPARE_WIDGET, "sage_compare", "sage-compare-host", 200, view);
    node.sageCompareReport = report;
    fitNode(node, 360);
}

// ---------------------------------------------------------------------------------------------------------------
// Patch node counters

export function countersText(stats) {
    const sage = stats.sage ?? {};
    const sageTotal = Object.values(sage).reduce((a, b) => a + (Number(b) || 0), 0);
    const fallbacks = stats.fallback ?? {};
    const fallbackTotal = Object.values(fallbacks).reduce((a, b) => a + (Number(b) || 0), 0);
    return { sageTotal, fallbackTotal };
}

function showCounters(node, stats) {
    if (!node || !stats) return;
    const { sageTotal, fallbackTotal } = countersText(stats);
    const root = el("div", "sage-stats");
    root.dataset.node = String(stats.node ?? "");
    root.dataset.total = String(stats.total ?? "");
    root.dataset.sage = String(sageTotal);
    root.dataset.fallback = String(fallbackTotal);
    root.dataset.recomputed = String(stats.recomputed ?? 0);
    root.dataset.rotary = String(stats.rotary_fused ?? 0);

    const head = el("div", "sage-stats-head");
    head.append(el("span", "sage-stats-badge", `Sage ${sageTotal} / ${stats.total ?? sageTotal + fallbackTotal}`));
    head.append(el("span", "sage-stats-badge sage-stats-fallback" + (fallbackTotal ? " sage-stats-warn" : ""),
        `fallback ${fallbackTotal}`));
    if (Number(stats.recomputed)) {
        head.append(el("span", "sage-stats-badge sage-stats-warn", `recomputed ${stats.recomputed}`));
    }
    root.append(head);

    const list = el("ul", "sage-stats-list");
    for (const [variant, n] of Object.entries(stats.sage ?? {})) {
        const li = el("li", "sage-stats-variant", `${variant}: ${n}`);
        li.dataset.variant = variant;
        li.dataset.count = String(n);
        list.append(li);
    }
    if (Number(stats.rotary_fused)) {  // Flux-family calls whose rotary embedding ran inside the quantization
        const li = el("li", "sage-stats-rotary", `rotary embedding in the quantization: ${stats.rotary_fused}`);
        li.dataset.count = String(stats.rotary_fused);
        list.append(li);
    }
    for (const [why, n] of Object.entries(stats.exact ?? {})) {
        const li = el("li", "sage-stats-exact", `exact, ${why}: ${n}`);
        li.dataset.exact = why;
        li.dataset.count = String(n);
        list.append(li);
    }
    for (const [reason, n] of Object.entries(stats.fallback ?? {})) {
        const li = el("li", "sage-stats-reason", `fallback, ${reason}: ${n}`);
        li.dataset.reason = reason;
        li.dataset.count = String(n);
        list.append(li);
    }
    root.append(list);

    showInDomWidget(node, STATS_WIDGET, "sage_stats", "sage-stats-host", 40, root);
    node.sageStats = stats;
    fitNode(node);
}

// ---------------------------------------------------------------------------------------------------------------

function findNode(id) {
    if (id === undefined || id === null) return null;
    const graph = app.graph;
    const key = String(id);
    // Nodes inside subgraphs are reported as "outer:inner"; the last part is the id within its graph.
    return graph?.getNodeById?.(key) ?? graph?.getNodeById?.(Number(key))
        ?? graph?.getNodeById?.(Number(key.split(":").pop())) ?? null;
}

// Keep the last reports so tests and other extensions can read what the server sent.
const received = { compare: {}, stats: {} };
window.sageAttentionPack = { received, createCompareView, countersText };

app.registerExtension({
    name: EXTENSION,

    async setup() {
        loadStylesheet();
        api.addEventListener("sage_attention.compare", ({ detail }) => {
            if (!detail) return;
            received.compare[String(detail.node)] = detail;
            showCompare(findNode(detail.node), detail);
        });
        api.addEventListener("sage_attention.stats", ({ detail }) => {
            if (!detail) return;
            received.stats[String(detail.node)] = detail;
            showCounters(findNode(detail.node), detail);
        });
    },

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== COMPARE_NODE) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const r = onExecuted?.apply(this, arguments);
            const report = message?.sage_compare?.[0];
            if (report) {
                received.compare[String(report.node ?? this.id)] = report;
                showCompare(this, report);
            }
            return r;
        };
    },
});

export { PATCH_NODE };
