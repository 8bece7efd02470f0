"""index.html's style sheet and script, inlined into the page (it loads nothing).

Plain CSS and a small vanilla script, kept as Python strings so that they install with the
package. The script only reads the page: it filters cards, concept columns and trees by
method, concept and a minimum score; shows the concept view's samples at one KL target;
expands or collapses the SNMF trees; and opens what the URL hash names (a permalink:
`#feature:JOB:7`, `#concept:food`), whatever the filters.
"""

from __future__ import annotations

STYLE = """
:root{--line:#d7dbe0;--muted:#5f6b7a;--accent:#1f5fbf;font-family:system-ui,-apple-system,
"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:14px;color:#1d232b;background:#fff}
body{margin:0}main{padding:0 20px 40px;max-width:1500px}
[hidden]{display:none!important}[id]{scroll-margin-top:90px}
header.top{position:sticky;top:0;z-index:2;background:#f6f8fa;border-bottom:1px solid var(--line);
padding:6px 20px;display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center}
header.top h1{font-size:18px;margin:0}nav a{margin-right:10px}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
h2{margin:28px 0 8px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{margin:20px 0 6px}h4{margin:14px 0 4px}
.note{color:var(--muted)}.warning{color:#8a1f11;font-weight:600}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#f0f3f6}tbody th{font-weight:600;white-space:nowrap}
tr.sep td{background:#e5f4e8}table.only-sep tr.same{display:none}
.bar{display:block;position:relative;height:6px;background:#eef1f4;margin-top:3px;min-width:90px}
.bar i{position:absolute;top:0;height:6px}.bar .ci{background:#8fb3e6}
.bar .pt{width:2px;background:#10325e}.bar .zero{width:1px;background:#a33;height:8px;top:-1px}
.plots{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}
figure img{max-width:100%;width:560px;border:1px solid var(--line)}
figcaption{color:var(--muted);font-size:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:12px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 10px;background:#fff}
.card header{font-size:14px;margin-bottom:4px}.card.focus,.concept.focus{outline:3px solid #f0a500}
.permalink{color:var(--muted);font-weight:700}
.badge{display:inline-block;background:#eef2fb;border:1px solid #c9d6f0;border-radius:10px;
padding:0 7px;margin-left:4px;font-size:12px}
.kind{display:inline-block;background:#f1f1f1;border-radius:3px;padding:0 5px;font-size:12px;
color:#444}
.desc{margin:4px 0}ul.facts{margin:4px 0;padding-left:18px}
ol.contexts{margin:6px 0;padding-left:22px;font-size:13px}
ol.contexts li{white-space:pre-wrap;word-break:break-word;line-height:1.55;margin-bottom:3px}
.score,.scores{color:var(--muted);font-size:12px;margin-right:6px;white-space:nowrap}
.tok.top{outline:1px solid #b23;border-radius:2px}
.p1{background:rgba(255,140,0,.09)}.p2{background:rgba(255,140,0,.18)}
.p3{background:rgba(255,140,0,.27)}.p4{background:rgba(255,140,0,.36)}
.p5{background:rgba(255,140,0,.45)}.p6{background:rgba(255,140,0,.54)}
.p7{background:rgba(255,140,0,.63)}.p8{background:rgba(255,140,0,.72)}
.p9{background:rgba(255,140,0,.82)}
.n1{background:rgba(40,110,255,.09)}.n2{background:rgba(40,110,255,.18)}
.n3{background:rgba(40,110,255,.27)}.n4{background:rgba(40,110,255,.36)}
.n5{background:rgba(40,110,255,.45)}.n6{background:rgba(40,110,255,.54)}
.n7{background:rgba(40,110,255,.63)}.n8{background:rgba(40,110,255,.72)}
.n9{background:rgba(40,110,255,.82)}
details.kl{margin:4px 0;border-left:3px solid var(--line);padding-left:6px}
details.kl summary{cursor:pointer;font-size:13px;color:#333}
details.kl ul{margin:2px 0;padding-left:16px}
.sample{white-space:pre-wrap;word-break:break-word;font-size:13px;background:#fafbfc;
border:1px solid #eceff2;border-radius:3px;padding:2px 5px;margin:2px 0 5px}
.prompt{color:var(--muted)}
.columns{display:flex;gap:10px;overflow-x:auto;align-items:flex-start}
.column{flex:1 1 300px;min-width:280px;border:1px solid var(--line);border-radius:6px;padding:6px 8px}
.column h4{margin:2px 0}
ul.tree,ul.tree ul{list-style:none;padding-left:18px;margin:2px 0}ul.tree>li{margin:1px 0}
ul.tree summary{cursor:pointer}ul.tree li.leaf{padding-left:15px}.hint{font-family:ui-monospace,monospace;background:#f3f3f3;
padding:0 4px;border-radius:3px;white-space:pre}
.filters{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.filters input{width:70px}
"""

SCRIPT = """
(function () {
  "use strict";
  var byId = function (id) { return document.getElementById(id); };
  var all = function (selector) { return Array.prototype.slice.call(document.querySelectorAll(selector)); };
  var method = byId("filter-method"), concept = byId("filter-concept");
  var score = byId("filter-score"), least = byId("filter-min"), kl = byId("kl-target");

  function passes(el) {
    var d = el.dataset, m = method.value, c = concept.value, v = parseFloat(least.value);
    if (m && d.method !== undefined && d.method !== m) { return false; }
    if (c && d.concepts !== undefined && JSON.parse(d.concepts).indexOf(c) < 0) { return false; }
    if (c && d.concept !== undefined && d.concept !== c) { return false; }
    if (!isNaN(v) && el.classList.contains("card")) {
      var s = parseFloat(d[score.value]);
      if (isNaN(s) || s < v) { return false; }
    }
    return true;
  }

  function apply() {
    var shown = 0;
    all("article.card").forEach(function (card) {
      var ok = passes(card) && (!card.classList.contains("extra") || card.classList.contains("opened"));
      card.hidden = !ok;
      if (ok) { shown += 1; }
    });
    all("section.job, section.tree, section.concept, div.column").forEach(function (el) {
      el.hidden = !passes(el);
    });
    byId("filter-count").textContent = shown + " feature cards shown";
  }

  function clear() {
    method.value = ""; concept.value = ""; least.value = "";
    apply();
  }

  function showKl() {
    if (!kl) { return; }
    all("#concepts details.kl").forEach(function (el) { el.hidden = el.dataset.kl !== kl.value; });
  }

  function openHash() {
    var id;
    try { id = decodeURIComponent(location.hash.slice(1)); } catch (e) { return; }
    var el = id ? byId(id) : null;
    if (!el) { return; }
    if (el.classList.contains("card")) { el.classList.add("opened"); }
    if (!passes(el) || el.closest("[hidden]")) { clear(); }
    apply();
    all(".focus").forEach(function (other) { other.classList.remove("focus"); });
    el.classList.add("focus");
    for (var up = el.parentElement; up; up = up.parentElement) {
      if (up.tagName === "DETAILS") { up.open = true; }
    }
    el.scrollIntoView({block: "start"});
  }

  [method, concept, score, least].forEach(function (el) { el.addEventListener("input", apply); });
  byId("filter-clear").addEventListener("click", clear);
  if (kl) { kl.addEventListener("change", showKl); }
  all("button[data-tree]").forEach(function (button) {
    button.addEventListener("click", function () {
      all("ul.tree details").forEach(function (el) { el.open = button.dataset.tree === "open"; });
    });
  });
  var only = byId("only-separated");
  if (only) {
    only.addEventListener("change", function () {
      all("table.differences").forEach(function (t) { t.classList.toggle("only-sep", only.checked); });
    });
  }
  window.addEventListener("hashchange", openHash);
  apply();
  showKl();
  openHash();
})();
"""
