"""
browser.py: the feature browser, one self-contained HTML page of an SAE's latents
(evals.py --html), and the prompt view, each token's top latents (evals.py --text).

    python evals.py out/topk_n32768_k32/ckpt.pt --html                  # the report, then features.html
    python evals.py out/topk_n32768_k32/ckpt.pt --text "To be, or not to be"

Everything is computed from the held-out sample evals.py already holds (Heldout): which
latents (select_latents), their contexts shaded by activation (top and per quartile), the
activation histogram, the logit effect (logit_effects), the N2G explanation (evals.n2g) and
the probe task a latent is best for (evals.probe_loss). The page has no external resource:
its CSS, script and data (JSON) are inline, the histograms are SVG drawn by the script.
"""

import json
import os
import time

import numpy as np
import torch

import evals
import explanations
from gpt import UserError

N_TOP = 12          # top-activating contexts per latent
N_QUARTILE = 3      # contexts sampled from each quartile of the rest of its activations
N_DEAD = 5          # dead latents listed (marked), of all the dead
HIST_BINS = 24
N_EFFECT = 8        # top contexts averaged for a latent's logit effect
N_LOGITS = 8        # boosted and suppressed tokens shown
PROMPT_TOP = 3      # latents per token in the prompt view


def firings(sae, data):
    """Every firing of the SAE code over the evaluated tokens -> (latent, row, value) numpy
    (F,) each, sorted by latent, then by value descending."""
    vals, idx = (t.cpu() for t in data.code(explanations.own_k(sae)))
    m = vals > 0
    lat, row, val = idx[m].numpy(), m.nonzero()[:, 0].numpy(), vals[m].double().numpy()
    order = np.lexsort((-val, lat))
    return lat[order], row[order], val[order]


def select_latents(freq, n, must=()):
    """The page's latents, the stated rule: `must` first (each probe task's best latent, the
    prompt's latents), then live latents evenly spaced in order of firing rate, a stratified
    sample over density from the rarest to the densest, up to n in all, then up to N_DEAD dead
    latents (marked as dead). freq (n_latents,) firing rates. -> list of latent ids."""
    must = [int(i) for i in dict.fromkeys(must)]
    live = np.flatnonzero(freq > 0)
    live = live[np.argsort(freq[live], kind="stable")]
    rest = live[~np.isin(live, must)]
    m = min(max(0, n - len(must)), len(rest))
    pick = rest[np.linspace(0, len(rest) - 1, m).round().astype(int)] if m else []
    dead = [int(i) for i in np.flatnonzero(freq == 0) if i not in must][:N_DEAD]
    return must + sorted(int(i) for i in pick) + dead


def example_groups(rows, vals, rng):
    """One latent's firings (rows, vals sorted by value descending) -> [(label, [(row, value)])]:
    the N_TOP largest, then N_QUARTILE drawn from each quartile (by rank) of the rest."""
    groups = [("top activations", list(zip(rows[:N_TOP], vals[:N_TOP])))]
    rest = np.arange(N_TOP, len(rows))
    for q, part in enumerate(np.array_split(rest, 4) if len(rest) >= 4 else []):
        pick = np.sort(rng.choice(part, min(N_QUARTILE, len(part)), replace=False))
        groups.append((f"quartile {4 - q} of the rest ({vals[part[-1]]:.3g} to {vals[part[0]]:.3g})",
                       [(rows[i], vals[i]) for i in pick]))
    return groups


def context(data, row, acts, span):
    """One example: [window, first token, offset of the activating token, activations of the
    latent over the shown tokens]; acts {row: value} of the latent, span (before, after)."""
    per = data.h.shape[1] - data.first
    w, t = divmod(int(row), per)
    t += data.first
    s, e = max(0, t - span[0]), min(data.h.shape[1], t + span[1] + 1)
    shade = [float(f"{acts.get(w * per + p - data.first, 0.0):.4g}") if p >= data.first else 0.0
             for p in range(s, e)]
    return [w, s, t - s, shade]


@torch.no_grad()
def logits_at(model, resid, layer, t):
    """Residuals after block `layer` (B, T, d) -> next-token logits (B, V) at positions t (B,),
    the rest of the model run on each context (the head only at t)."""
    for block in model.transformer.h[layer + 1:]:
        resid = block(resid)
    return model.lm_head(model.transformer.ln_f(resid[torch.arange(len(t), device=resid.device), t]))


@torch.no_grad()
def logit_effects(model, sae, data, layer, picks, batch=32):
    """picks {latent: [(row, value)]}. Per latent: the mean over its contexts of the next-token
    logit change at the activating position t when the latent's contribution value * W_dec[i]
    (times the token's scale: the raw residual space) is subtracted there and the rest of the
    model runs (paper §4.5's ablation, at t only), each change minus its median over the
    vocabulary. -> {latent: (V,) effect: positive = the latent boosts that next token}."""
    dev, per = data.h.device, data.h.shape[1] - data.first
    jobs = [(lat, int(r), float(v)) for lat, rv in picks.items() for r, v in rv]
    out = {lat: 0.0 for lat in picks}
    for i in range(0, len(jobs), batch):
        lat, r, v = (torch.tensor(c, device=dev) for c in zip(*jobs[i:i + batch]))
        w, t = r // per, r % per + data.first
        h = data.h[w, :int(t.max()) + 1]  # (B, t_max + 1, d): later positions cannot matter
        ablated = h.clone()
        ablated[torch.arange(len(r), device=dev), t] -= v[:, None] * sae.W_dec[lat] * data.scale[r]
        logits = logits_at(model, torch.cat([h, ablated]), layer, torch.cat([t, t])).float()
        delta = logits[:len(r)] - logits[len(r):]
        delta -= delta.median(-1, keepdim=True).values
        for b, l in enumerate(lat.tolist()):
            out[l] = out[l] + delta[b].cpu() / len(picks[l])
    return out


@torch.no_grad()
def prompt_view(model, sae, tok, layer, text, include_first):
    """Each token of text (cut to block_size) -> [(token id, [(latent, activation)])]: the
    PROMPT_TOP largest of its code. Position 0 gets None unless the SAE was trained on it
    (its residual is an outlier)."""
    ids = tok.encode(text)[:model.config.block_size]
    if not ids:
        raise UserError("--text is empty: give the prompt to show, e.g. --text 'To be, or not to be'")
    h = model.resid(torch.tensor([ids], device=sae.b_pre.device), layer)[0].float()
    vals, idx = evals.encode_sorted(sae, sae.normalize_input(h)[0], explanations.own_k(sae) or 1)[:2]
    if sae.cfg.activation == "batchtopk":
        vals = sae.jumprelu(vals)
    view = []
    for p, i in enumerate(ids):
        top = None if p == 0 and not include_first else [(int(l), float(v)) for v, l in
                                                       zip(vals[p, :PROMPT_TOP].tolist(), idx[p, :PROMPT_TOP].tolist())
                                                       if v > 0]
        view.append((i, top))
    return view


def prompt_lines(tok, view, explain):
    """The prompt view as text lines; explain {latent: N2G explanation} (missing: none)."""
    lines = [f"prompt view: each token's top {PROMPT_TOP} latents (activation; N2G top pattern, F1)"]
    for i, top in view:
        s = tok.decode([i]).replace("\n", "⏎")
        cells = []
        for lat, act in top or []:
            e = explain.get(lat)
            cells.append(f"#{lat} {act:.3f}" + (f" ({e['patterns'][0]}, F1 {e['f1']:.2f})" if e and e["patterns"]
                                                else " (no N2G)"))
        lines.append(f"    {s!r:<10}" + ("   ".join(cells) if cells else
                                              "- (position 0: not encoded, as in training)" if top is None else "-"))
    return lines


def explain(model, sae, data, layer, tok, latents, n_examples, seed):
    """{latent: N2G explanation} for those of `latents` that evals.n2g can score."""
    if not latents:
        return {}
    r = evals.n2g(model, sae, data, layer, tok, len(latents), n_examples, seed, latents=latents)
    return {e["latent"]: e for e in r["explanations"]}


def latent_entry(lat, fired, stats, effect, expl, probes, token_text, peak):
    """One latent's record on the page. fired: (rows, vals) descending, or empty for dead."""
    count, mean, mx = stats
    e = {"id": lat, "count": int(count), "mean": mean, "max": mx, "peak": peak,
         "probe": probes.get(lat, []), "n2g": None, "boost": [], "suppress": []}
    if expl is not None:
        e["n2g"] = {k: expl[k] for k in ("precision", "recall", "f1", "patterns", "test_fires")}
    if effect is not None:
        top, low = effect.topk(N_LOGITS), (-effect).topk(N_LOGITS)
        e["boost"] = [[token_text(int(i)), round(float(v), 3)] for v, i in zip(*top)]
        e["suppress"] = [[token_text(int(i)), round(-float(v), 3)] for v, i in zip(*low)]
    if count:
        e["hist"] = np.histogram(fired[1], bins=HIST_BINS, range=(0, mx))[0].tolist()
    return e


def build(model, sae, tok, data, layer, res, meta, n_latents, n_examples, seed, text=None):
    """The page's data, a JSON-ready dict: the run (meta and headline metrics), the held-out
    windows as token ids with the strings of the ids used, one record per listed latent
    (latent_entry) with its example groups, and the prompt view (or None)."""
    rng = np.random.default_rng(seed)
    lat, row, val = firings(sae, data)
    n, N = sae.cfg.n_latents, len(data.x)
    bounds = np.searchsorted(lat, np.arange(n + 1))
    count = np.diff(bounds)
    probes = {}
    for t in res.get("probe", {}).get("tasks", []):
        probes.setdefault(t["latent"], []).append({"task": t["task"], "ce": t["latent_ce"]})
    view = prompt_view(model, sae, tok, layer, text, data.first == 0) if text else None
    listed = select_latents(count / N, n_latents, [*probes, *(l for _, top in view or [] for l, _ in top or [])])
    fired = {l: (row[bounds[l]:bounds[l + 1]], val[bounds[l]:bounds[l + 1]]) for l in listed}
    live = [l for l in listed if count[l]]
    groups = {l: example_groups(*fired[l], rng) for l in live}
    effects = logit_effects(model, sae, data, layer, {l: groups[l][0][1][:N_EFFECT] for l in live})
    expl = explain(model, sae, data, layer, tok, live, n_examples, seed)
    span = (12, 3) if tok.kind == "gpt2" else (48, 12)
    used = set(data.windows[:, :-1].unique().tolist()) | {i for i, _ in view or []}
    token_text = lambda i: (used.add(i), tok.decode([i]))[1]
    latents = []
    for l in listed:
        mean, mx = (float(fired[l][1].mean()), float(fired[l][1][0])) if count[l] else (0.0, 0.0)
        e = latent_entry(l, fired[l], (count[l], mean, mx), effects.get(l), expl.get(l), probes, token_text,
                         float(data.peak[l]))
        acts = dict(zip(fired[l][0].tolist(), fired[l][1].tolist()))
        e["groups"] = [{"label": g, "examples": [context(data, r, acts, span) for r, _ in ex]}
                       for g, ex in groups.get(l, [])]
        latents.append(e)
    return {"meta": {**meta, "tokens": N, "n_dead": int((count == 0).sum()), "kind": tok.kind,
                     "rule": f"the best latent of each probe task and the prompt's latents, then live latents "
                             f"evenly spaced by firing rate, up to {n_latents} in all, then up to {N_DEAD} dead ones"},
            "metrics": headline(res), "vocab": {str(i): tok.decode([i]) for i in sorted(used)},
            "windows": data.windows[:, :-1].tolist(), "latents": latents,
            "prompt": None if view is None else [[i, top] for i, top in view]}


def headline(res):
    """A few of the report's numbers for the page's header: [(label, value)]."""
    pick = [("reconstruction", "fvu", "FVU", ".4f"), ("reconstruction", "l0", "L0", ".1f"),
            ("activity", "dead_frac", "dead", ".2%"), ("downstream", "delta_ce", "delta CE", "+.4f"),
            ("saebench", "explained_variance", "explained var.", ".4f"), ("saebench", "cossim", "cos(x, x_hat)", ".4f"),
            ("n2g", "median_f1", "N2G median F1", ".3f")]
    return [[label, format(res[s][k], spec)] for s, k, label, spec in pick
            if s in res and res[s].get(k) is not None]


def write(path, page):
    """The page as one HTML file: the template with the data inlined as JSON (every "<" escaped,
    so no string in it can end the script element)."""
    blob = json.dumps(evals.json_ready(page), separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    with open(path, "w", encoding="utf-8") as f:
        f.write(TEMPLATE.replace("/*DATA*/null", blob, 1))
    return path


# The page: CSS, then the script that draws the index, the latent panel and the prompt view
# from the inlined data D (routes: #latent=ID, #prompt).
TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nanoSAE feature browser</title>
<style>
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1c1f24;background:#f4f5f7}
header{background:#1f2937;color:#f9fafb;padding:10px 16px}
header h1{font-size:17px;margin:0 0 4px}
header .sub{color:#cbd5e1;font-size:12.5px}#rule{margin-top:4px}
.chips{margin-top:6px;display:flex;flex-wrap:wrap;gap:6px}
.chip{background:#374151;border-radius:4px;padding:1px 8px;font-size:12.5px}
nav{display:flex;gap:4px;padding:8px 16px 0;border-bottom:1px solid #d6d9de;background:#fff}
nav a{padding:6px 14px;text-decoration:none;color:#374151;border:1px solid transparent;border-bottom:none;border-radius:6px 6px 0 0}
nav a.on{background:#f4f5f7;border-color:#d6d9de;color:#111;font-weight:600}
#latents{display:grid;grid-template-columns:minmax(360px,42%) minmax(0,1fr);gap:12px;padding:12px;height:calc(100vh - 118px)}
.pane{background:#fff;border:1px solid #d6d9de;border-radius:6px;overflow:auto;min-height:0}
#tools{position:sticky;top:0;background:#fff;padding:8px;border-bottom:1px solid #e5e7eb;display:flex;gap:8px;align-items:center;z-index:2}
#filter{flex:1;padding:5px 8px;border:1px solid #c4c9d0;border-radius:4px;font:inherit}
#count{color:#6b7280;font-size:12.5px;white-space:nowrap}
table{border-collapse:collapse;width:100%}
#index th{position:sticky;top:47px;background:#eef1f5;text-align:left;font-size:12px;padding:5px 6px;cursor:pointer;white-space:nowrap;z-index:1}
#index th.sorted::after{content:" \25BE"}#index th.sorted.asc::after{content:" \25B4"}
#index td{padding:4px 6px;border-top:1px solid #eef0f3;font-size:12.5px;vertical-align:top}
#index td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#index tr{cursor:pointer}#index tr:hover{background:#f5f8ff}#index tr.sel{background:#fff1d6}
.pat,.tokc{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
.badge{display:inline-block;border-radius:3px;padding:0 5px;margin-left:4px;font-size:11px;font-weight:600;vertical-align:1px}
.b-dead{background:#e5e7eb;color:#4b5563}.b-dense{background:#fde2e1;color:#a61b1b}.b-probe{background:#dbeafe;color:#1e40af}
#detail{padding:12px 16px}
#detail h2{margin:0 0 4px;font-size:19px}
.stats{color:#4b5563;margin-bottom:10px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:10px;margin-bottom:12px}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:8px 10px;background:#fcfcfd;min-width:0;overflow:hidden}
.card h4{margin:0 0 6px;font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#6b7280}
.card table td{padding:1px 4px;font-size:12.5px}
.up{color:#166534}.down{color:#991b1b}
h3{font-size:13.5px;margin:14px 0 4px;color:#374151}
.ex{display:grid;grid-template-columns:58px minmax(0,1fr);gap:8px;padding:3px 0;border-top:1px solid #f1f2f4}
.ex .v{text-align:right;font-variant-numeric:tabular-nums;color:#6b7280;font-size:12px;padding-top:2px}
.ctx{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.7}
.ctx span{border-radius:2px}
.ctx .hit{outline:2px solid #1d4ed8;outline-offset:0;font-weight:700}
.ctx .nl{color:#9ca3af}
.note{color:#6b7280;font-size:12.5px}
#prompt{padding:12px 16px}
#prompt .pane{padding:10px 14px}
#ptable td{padding:3px 8px;border-top:1px solid #eef0f3;vertical-align:top;font-size:13px}
#ptable a{color:#1d4ed8;text-decoration:none;font-weight:600}
.hidden{display:none!important}
@media (max-width:900px){#latents{grid-template-columns:1fr;height:auto}.pane{max-height:none}}
</style></head>
<body>
<header><h1>nanoSAE feature browser</h1><div class="sub" id="sub"></div><div class="chips" id="chips"></div><div class="sub" id="rule"></div></header>
<nav><a href="#" id="tab-latents" class="on">Latents</a><a href="#prompt" id="tab-prompt">Prompt view</a></nav>
<div id="latents">
 <div class="pane" id="left"><div id="tools"><input id="filter" placeholder="filter: latent id, N2G pattern, token, probe task, context text"><span id="count"></span></div>
  <table id="index"><thead><tr></tr></thead><tbody></tbody></table></div>
 <div class="pane" id="detail"></div>
</div>
<div id="prompt" class="hidden"><div class="pane" id="pbody"></div></div>
<script>
"use strict";
const D = /*DATA*/null;
const $ = s => document.querySelector(s);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of kids.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
const tok = id => D.vocab[id] ?? "\uFFFD";
const vis = s => s.replace(/\n/g, "\u23CE");
const visTok = s => vis(s).replace(/ /g, "\u2423");
const fmt = (x, d = 3) => Number(x).toPrecision(d);
const pct = x => (100 * x).toFixed(x < 0.001 ? 3 : 2) + "%";
const N = D.meta.tokens, L = D.latents, byId = new Map(L.map(l => [l.id, l]));
const ctxText = ex => D.windows[ex[0]].slice(ex[1], ex[1] + ex[3].length).map(tok).join("");
for (const l of L) {
  l.density = l.count / N; l.f1 = l.n2g ? l.n2g.f1 : -1;
  l.pattern = l.n2g && l.n2g.patterns.length ? l.n2g.patterns[0] : "";
  l.search = ["#" + l.id, ...(l.n2g ? l.n2g.patterns : []), ...l.boost.map(b => b[0]),
              ...l.probe.map(p => p.task), ...l.groups.flatMap(g => g.examples.map(ctxText))].join("\n").toLowerCase();
}
function badges(l) {
  const b = [];
  if (!l.count) b.push(el("span", {class: "badge b-dead"}, "dead"));
  if (l.density > 0.1) b.push(el("span", {class: "badge b-dense"}, ">10%"));
  else if (l.density > 0.01) b.push(el("span", {class: "badge b-dense"}, ">1%"));
  if (l.probe.length) b.push(el("span", {class: "badge b-probe", title: l.probe.map(p => p.task).join(", ")}, "probe"));
  return b;
}
// ---- header
(function header() {
  const m = D.meta;
  $("#sub").textContent = `${m.checkpoint} (${m.weights} weights) \u00b7 n_latents ${m.n_latents.toLocaleString()} \u00b7 ` +
    m.label + ` \u00b7 subject ${m.subject}, layer ${m.layer} \u00b7 ` +
    `${N.toLocaleString()} held-out tokens \u00b7 ${L.length} latents listed, ${m.n_dead.toLocaleString()} dead in all`;
  for (const [k, v] of D.metrics) $("#chips").append(el("span", {class: "chip"}, `${k} ${v}`));
  $("#rule").textContent = "listed: " + m.rule;
})();
// ---- index
const COLS = [["id", "latent"], ["density", "density"], ["mean", "mean"], ["max", "max"], ["f1", "N2G F1"],
              ["pattern", "N2G top pattern"], ["boost", "boosts"]];
let sortKey = "density", sortAsc = false, current = null;
function drawIndex() {
  const q = $("#filter").value.trim().toLowerCase();
  const rows = L.filter(l => !q || l.search.includes(q));
  const key = sortKey === "boost" ? (l => l.boost.length ? l.boost[0][1] : -1) : (l => l[sortKey]);
  rows.sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (sortAsc ? 1 : -1); });
  const head = $("#index thead tr"); head.replaceChildren();
  for (const [k, label] of COLS) head.append(el("th", {class: k === sortKey ? "sorted" + (sortAsc ? " asc" : "") : "",
    onclick: () => { sortAsc = k === sortKey ? !sortAsc : k === "pattern"; sortKey = k; drawIndex(); }}, label));
  const body = $("#index tbody"); body.replaceChildren();
  for (const l of rows) body.append(el("tr", {class: l.id === current ? "sel" : "", "data-id": l.id, onclick: () => { location.hash = "latent=" + l.id; }},
    el("td", {style: "white-space:nowrap"}, "#" + l.id, badges(l)), el("td", {class: "num"}, l.count ? pct(l.density) : "0"),
    el("td", {class: "num"}, l.count ? fmt(l.mean) : "-"), el("td", {class: "num"}, l.count ? fmt(l.max) : "-"),
    el("td", {class: "num"}, l.n2g ? l.n2g.f1.toFixed(2) : "-"), el("td", {class: "pat"}, l.pattern),
    el("td", {class: "tokc"}, l.boost.slice(0, 3).map(b => visTok(b[0])).join("  "))));
  $("#count").textContent = `${rows.length} of ${L.length}`;
}
$("#filter").addEventListener("input", drawIndex);
// ---- one latent
function histogram(l) {
  const w = 260, h = 86, c = l.hist, top = Math.max(...c, 1), bw = w / c.length;
  const holder = el("div"); holder.innerHTML = "<svg></svg>";  // the HTML parser gives the SVG namespace
  const svg = holder.firstChild;
  svg.setAttribute("viewBox", `0 0 ${w} ${h + 16}`); svg.setAttribute("width", "100%");
  const add = (tag, a) => { const e = document.createElementNS(svg.namespaceURI, tag); for (const k in a) e.setAttribute(k, a[k]); svg.append(e); return e; };
  c.forEach((n, i) => { const bh = n ? Math.max(1, h * n / top) : 0;
    add("rect", {x: i * bw + 0.5, y: h - bh, width: bw - 1, height: bh, fill: "#e0702a"}).append(Object.assign(
      document.createElementNS(svg.namespaceURI, "title"), {textContent: `${n} tokens`})); });
  add("line", {x1: 0, x2: w, y1: h, y2: h, stroke: "#9ca3af"});
  add("text", {x: 0, y: h + 13, "font-size": 11, fill: "#6b7280"}).textContent = "0";
  add("text", {x: w, y: h + 13, "font-size": 11, fill: "#6b7280", "text-anchor": "end"}).textContent = fmt(l.max);
  add("text", {x: w / 2, y: h + 13, "font-size": 11, fill: "#6b7280", "text-anchor": "middle"}).textContent = "activation";
  return svg;
}
function contextLine(l, ex) {
  const [w, s, t, acts] = ex, ids = D.windows[w].slice(s, s + acts.length);
  const line = el("div", {class: "ctx"});
  ids.forEach((id, i) => {
    const a = acts[i], text = tok(id), alpha = l.max > 0 ? Math.min(1, a / l.max) : 0;
    const span = el("span", {"data-act": a, title: `${JSON.stringify(text)}  activation ${a}`},
                    text === "\n" ? el("span", {class: "nl"}, "\u23CE") : text);
    if (a > 0) span.style.background = `rgba(234, 88, 12, ${(0.12 + 0.78 * alpha).toFixed(3)})`;
    if (i === t) span.classList.add("hit");
    line.append(span);
  });
  return el("div", {class: "ex"}, el("div", {class: "v"}, fmt(acts[t])), line);
}
function logitCard(l) {
  if (!l.boost.length) return el("div", {class: "note"}, "no contexts: not measured");
  const rows = l.boost.map((b, i) => el("tr", {}, el("td", {class: "pat up"}, visTok(b[0])), el("td", {class: "num up"}, "+" + b[1].toFixed(2)),
    el("td", {class: "pat down"}, visTok(l.suppress[i][0])), el("td", {class: "num down"}, l.suppress[i][1].toFixed(2))));
  return el("table", {}, el("tr", {}, el("td", {class: "note"}, "boosted"), el("td"), el("td", {class: "note"}, "suppressed")), rows);
}
function n2gCard(l) {
  if (!l.n2g) return el("div", {class: "note"}, l.count ? "not scored: no fires in the scoring half" : "dead");
  const n = l.n2g;
  return el("div", {}, el("div", {}, `F1 ${n.f1.toFixed(2)} \u00b7 precision ${n.precision.toFixed(2)} \u00b7 recall ${n.recall.toFixed(2)}`),
    el("div", {class: "note"}, `${n.test_fires} fires scored; ^ start, * any token, \u2423 space, \u23CE newline`),
    n.patterns.slice(0, 6).map(p => el("div", {class: "pat"}, p)));
}
function drawLatent(id) {
  const l = byId.get(id), d = $("#detail");
  current = id; d.replaceChildren(); drawIndex();
  if (!l) { d.append(el("p", {class: "note"}, `latent #${id} is not on this page (evals.py --html_latents N lists more)`)); return; }
  d.append(el("h2", {}, `Latent #${l.id}`, badges(l)));
  d.append(el("div", {class: "stats"}, l.count ? `fires on ${l.count.toLocaleString()} of ${N.toLocaleString()} held-out tokens ` +
    `(${pct(l.density)}) \u00b7 mean activation ${fmt(l.mean)} \u00b7 max ${fmt(l.max)}`
    : `never fires on the ${N.toLocaleString()} held-out tokens; its largest pre-activation there: ${fmt(l.peak)}`));
  const cards = el("div", {class: "cards"});
  if (l.count) cards.append(el("div", {class: "card"}, el("h4", {}, "activation histogram (firing tokens)"), histogram(l)));
  cards.append(el("div", {class: "card"}, el("h4", {}, "logit effect: ablated at the token, rest of model"), logitCard(l)));
  cards.append(el("div", {class: "card"}, el("h4", {}, "N2G explanation"), n2gCard(l)));
  if (l.probe.length) cards.append(el("div", {class: "card"}, el("h4", {}, "best latent for probe task"),
    l.probe.map(p => el("div", {}, `${p.task} (test CE ${p.ce.toFixed(3)})`))));
  d.append(cards);
  if (l.groups.length) d.append(el("div", {class: "note"}, "each token shaded by this latent's activation " +
    "(divided by its max); outlined: the activating token, whose activation is on the left; hover a token for its value"));
  for (const g of l.groups) { d.append(el("h3", {}, g.label)); for (const ex of g.examples) d.append(contextLine(l, ex)); }
  d.scrollTop = 0;
}
// ---- prompt view
function drawPrompt() {
  const b = $("#pbody"); b.replaceChildren();
  if (!D.prompt) { b.append(el("p", {class: "note"}, "no prompt: run evals.py CKPT --html --text \"...\" to add one")); return; }
  b.append(el("h3", {}, `each token's top latents (activation; N2G top pattern)`));
  const t = el("table", {id: "ptable"});
  b.append(el("div", {class: "ctx", style: "margin-bottom:8px"}, D.prompt.map(([id]) => tok(id)).join("")));
  for (const [id, top] of D.prompt) t.append(el("tr", {}, el("td", {class: "ctx"}, visTok(tok(id))),
    el("td", {}, top === null ? el("span", {class: "note"}, "position 0: not encoded, as in training") : top.length ? top.map(([lat, a]) => el("span", {style: "margin-right:18px"},
      el("a", {href: "#latent=" + lat}, "#" + lat), ` ${fmt(a)} `, el("span", {class: "pat note"}, byId.get(lat)?.pattern || ""))) :
      el("span", {class: "note"}, "-"))));
  b.append(t);
}
function route() {
  const h = location.hash, prompt = h === "#prompt";
  $("#latents").classList.toggle("hidden", prompt); $("#prompt").classList.toggle("hidden", !prompt);
  $("#tab-latents").classList.toggle("on", !prompt); $("#tab-prompt").classList.toggle("on", prompt);
  if (prompt) return drawPrompt();
  const m = h.match(/^#latent=(\d+)$/);
  const first = $("#index tbody tr");
  drawLatent(m ? Number(m[1]) : (current ?? (first ? Number(first.dataset.id) : -1)));
}
$("#tab-latents").addEventListener("click", e => { e.preventDefault(); location.hash = current !== null ? "latent=" + current : ""; route(); });
window.addEventListener("hashchange", route);
drawIndex(); route();
</script></body></html>
"""


def run(args, model, sae, tok, data, layer, res, meta, out_dir):
    """evals.py --html / --text. --text alone: print the prompt view, N2G explaining its
    latents. --html: build and write the page (features.html, features_raw.html with --raw),
    printing the prompt view if given. -> {"seconds": ..., "path": page or None}."""
    if args.html_latents < 1:
        raise UserError(f"--html_latents must be positive, got {args.html_latents}")
    t = time.time()
    with torch.no_grad():
        if not args.html:
            view = prompt_view(model, sae, tok, layer, args.text, data.first == 0)
            lats = sorted({lat for _, top in view for lat, _ in top or []})
            print("\n".join(prompt_lines(tok, view, explain(model, sae, data, layer, tok, lats, args.n2g_examples,
                                                             args.seed))))
            return {"seconds": round(time.time() - t, 2), "path": None}
        page = build(model, sae, tok, data, layer, res, meta, args.html_latents, args.n2g_examples, args.seed,
                     args.text or None)
    if page["prompt"]:
        expl = {e["id"]: e["n2g"] for e in page["latents"] if e["n2g"]}
        print("\n".join(prompt_lines(tok, page["prompt"], expl)))
    path = write(os.path.join(out_dir, "features_raw.html" if args.raw else "features.html"), page)
    seconds = round(time.time() - t, 2)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, {len(page['latents'])} latents, {seconds:.1f} s)")
    return {"seconds": seconds, "path": path}
