"""The contact sheet's stylesheet and script (the page inlines both: it needs no network).

The script reads the job data blocks, draws the cards a screenful at a time, and filters,
groups and sorts them; the view lives in the URL fragment. It builds every card with
``textContent``, so text from the database is never markup.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1f2328;--muted:#59636e;--line:#d1d9e0;
--ok:#1a7f37;--ok-bg:#dafbe1;--bad:#cf222e;--bad-bg:#ffebe9;--late:#9a6700;--late-bg:#fff8c5;
--unk:#8250df;--unk-bg:#fbefff;--wait:#0969da;--wait-bg:#ddf4ff;--skip:#59636e;--skip-bg:#eaeef2}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
h1,h2,h3{margin:0;line-height:1.25}
code,h3{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.top{padding:18px 20px 8px;max-width:1800px;margin:0 auto}
.title{display:flex;align-items:center;gap:12px}
h1{font-size:24px;overflow-wrap:anywhere}
.runstate{border:1px solid var(--line);border-radius:999px;padding:1px 10px;color:var(--muted)}
.sub{color:var(--muted);margin:4px 0 12px;overflow-wrap:anywhere}
.note{padding:6px 10px;border-radius:6px;background:var(--late-bg);color:var(--late)}
.note.state-running{background:var(--wait-bg);color:var(--wait)}
.note.state-stopped{background:var(--bad-bg);color:var(--bad)}
.runstate.state-finished{border-color:var(--ok);color:var(--ok);background:var(--ok-bg)}
.runstate.state-running{border-color:var(--wait);color:var(--wait);background:var(--wait-bg)}
.runstate.state-interrupted,.runstate.state-incomplete{border-color:var(--late);color:var(--late);
background:var(--late-bg)}
.runstate.state-stopped{border-color:var(--bad);color:var(--bad);background:var(--bad-bg)}
.next{margin:10px 0 0}.next h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;
color:var(--muted);margin:0 0 4px}.next ul{margin:0;padding-left:18px}
.next code,.next-step code{background:#eaeef2;border-radius:4px;padding:0 4px;font-size:12.5px}
.summary{display:flex;flex-wrap:wrap;gap:10px}
.tile{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 14px;
min-width:120px}
.tile span{display:block;color:var(--muted);font-size:12px;text-transform:uppercase;
letter-spacing:.04em}
.tile b{font-size:20px}
.bar{display:flex;height:8px;border-radius:4px;overflow:hidden;margin:12px 0 6px;
background:var(--line)}
.bar i.st-succeeded{background:var(--ok)}.bar i.st-failed{background:var(--bad)}
.bar i.st-timed_out{background:#d4a72c}.bar i.st-unknown{background:var(--unk)}
.bar i.st-pending{background:var(--wait)}.bar i.st-skipped{background:#afb8c1}
.shared{color:var(--muted);margin:6px 0}.shared i,.var i{font-style:normal;color:var(--muted)}
.reasons h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);
margin:10px 0 4px}
.reasons ul{list-style:none;margin:0;padding:0;display:flex;flex-direction:column;gap:4px}
.reason{all:unset;cursor:pointer;display:block;max-width:100%;white-space:nowrap;
overflow:hidden;text-overflow:ellipsis;padding:2px 6px;border-radius:6px}
.reason:hover,.reason:focus-visible{background:#eaeef2}
.reason span:last-child{color:var(--muted)}
.controls{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;align-items:center;
gap:8px 14px;padding:10px 20px;background:rgba(246,247,249,.95);
border-bottom:1px solid var(--line);backdrop-filter:blur(4px)}
.controls input[type=search]{flex:0 1 300px;min-width:200px;padding:7px 10px;font:inherit;
border:1px solid var(--line);border-radius:6px;background:#fff}
select,#dir{font:inherit;padding:5px 8px;border:1px solid var(--line);border-radius:6px;
background:#fff;color:var(--ink)}
#dir{cursor:pointer;min-width:34px}
#shown{color:var(--muted);margin-left:auto}
.chips{display:flex;flex-wrap:wrap;gap:6px}
.chip{display:inline-flex;align-items:center;gap:4px;padding:3px 10px;border-radius:999px;
cursor:pointer;user-select:none;border:1px solid currentColor;font-weight:500}
.chip input{position:absolute;opacity:0;pointer-events:none}
.chip:has(input:not(:checked)){background:#fff !important;color:#8c959f !important;
text-decoration:line-through}
.chip:has(input:focus-visible){outline:2px solid var(--wait);outline-offset:1px}
.st-succeeded{--c:var(--ok);--cb:var(--ok-bg)}.st-failed{--c:var(--bad);--cb:var(--bad-bg)}
.st-timed_out{--c:var(--late);--cb:var(--late-bg)}.st-unknown{--c:var(--unk);--cb:var(--unk-bg)}
.st-pending{--c:var(--wait);--cb:var(--wait-bg)}.st-skipped{--c:var(--skip);--cb:var(--skip-bg)}
.chip,.badge{color:var(--c);background:var(--cb)}
.badge{padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap}
main{max-width:1800px;margin:0 auto;padding:6px 20px 40px}
.group{margin-top:18px}
.group h2{font-size:17px;margin-bottom:10px;display:flex;flex-wrap:wrap;align-items:baseline;
gap:4px 10px}
.group h2 small{font-size:13px;font-weight:400;color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--card,220px),1fr));gap:12px;
align-items:start}
.card{background:var(--card);border:1px solid var(--line);border-top:4px solid var(--c);
border-radius:10px;overflow:hidden;display:flex;flex-direction:column;
box-shadow:0 1px 2px rgba(31,35,40,.06)}
.media{width:100%;aspect-ratio:16/9;background:#1f2328;display:flex;align-items:center;
justify-content:center;position:relative;overflow:hidden}
.media .badge{position:absolute;top:8px;left:8px;box-shadow:0 0 0 1px rgba(255,255,255,.7)}
.media video{width:100%;height:100%;object-fit:contain;display:block}
.placeholder{width:100%;height:100%;display:flex;align-items:center;justify-content:center;
background:repeating-linear-gradient(135deg,#f0f2f4 0 12px,#e8ebef 12px 24px);color:var(--muted);
font-weight:500;padding:12px;text-align:center}
.placeholder span{background:rgba(255,255,255,.85);padding:4px 10px;border-radius:6px}
.card.st-failed .placeholder span{color:var(--bad)}
.body{padding:10px 12px 12px;display:flex;flex-direction:column;gap:7px;flex:1}
.card h3{font-size:13px;overflow-wrap:anywhere}
.vars{display:flex;flex-wrap:wrap;gap:4px}.vars:empty{display:none}
.var{font-size:12px;background:#eef1f4;border-radius:4px;padding:1px 6px;max-width:100%;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.prompt{margin:0;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;
overflow:hidden;cursor:pointer;overflow-wrap:anywhere}
.prompt.open{display:block}
.params{margin:0;color:var(--muted);font-size:12.5px}
.error{background:var(--bad-bg);color:#82071e;border-radius:6px;padding:6px 8px;font-size:13px;
overflow-wrap:anywhere}
.error b{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.meta{display:flex;flex-wrap:wrap;gap:4px 14px;margin:auto 0 0;font-size:12.5px}
.meta dt{color:var(--muted);font-size:11px;text-transform:uppercase;letter-spacing:.03em}
.meta dd{margin:0;font-variant-numeric:tabular-nums;white-space:nowrap}
details{font-size:12.5px;color:var(--muted)}
summary{cursor:pointer}
details dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:6px 0 0}
details dd{margin:0;color:var(--ink);overflow-wrap:anywhere}
#empty{text-align:center;color:var(--muted);font-size:16px;padding:40px}
[hidden]{display:none !important}
.sources{display:flex;align-items:center;gap:6px}
.source{margin:0;display:flex;flex-direction:column;align-items:center;gap:2px;min-width:0;
flex:0 1 auto}
.source img{max-height:56px;max-width:100%;border-radius:4px;display:block;
border:1px solid var(--line)}
.source figcaption{font-size:11px;color:var(--muted)}
.source .nothumb{font-size:11px;overflow-wrap:anywhere}
.arrow{color:var(--muted)}
.next-step{margin:0;font-size:12.5px;overflow-wrap:anywhere}
#more{text-align:center;padding:0 0 40px}
#more button{font:inherit;padding:6px 14px;border:1px solid var(--line);border-radius:6px;
background:#fff;cursor:pointer}
.loading{color:var(--muted);text-align:center;padding:40px}
.links{color:var(--muted);margin:6px 0}
"""

JS = r""""use strict";
(function () {
  var meta = JSON.parse(document.getElementById("report-meta").textContent);
  var jobs = [];
  Array.prototype.forEach.call(document.querySelectorAll("script.jobs"), function (block) {
    var part = JSON.parse(block.textContent);
    for (var k = 0; k < part.length; k += 1) jobs.push(part[k]);
  });
  var dims = meta.dims, order = meta.statuses, PAGE = 60;
  var GLYPH = {succeeded: "✓", failed: "✕", timed_out: "◷", unknown: "?", pending: "…",
    skipped: "–"};
  var KIND = {text: "text → video", image: "image → video", "first-last": "first + last frame"};
  var main = document.getElementById("groups");
  var more = document.getElementById("more"), moreButton = document.getElementById("more-button");
  var q = document.getElementById("q"), group = document.getElementById("group");
  var sort = document.getElementById("sort"), dir = document.getElementById("dir");
  var zoom = document.getElementById("zoom");
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input[name=status]"));
  var descending = false, cards = [], plan = [], at = {g: 0, i: 0}, drawn = 0, shown = 0;
  function dim(key) { return dims.filter(function (d) { return d.key === key; })[0]; }
  function value(job, key) {
    if (key === "seq") return job.seq;
    if (key === "id") return job.id;
    if (key === "status") return order.indexOf(job.status);
    if (key === "cost") return job.cost === undefined ? null : job.cost;
    if (key === "render") return job.render === undefined ? null : job.render;
    var parts = key.split(":");
    var v = parts[0] === "var" ? (job.vars || {})[parts[1]] : job[parts[1]];
    return v === undefined ? null : v;
  }
  function compare(a, b) {
    if (a === b) return 0;
    if (a === null) return 1;
    if (b === null) return -1;
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a).localeCompare(String(b), undefined, {numeric: true});
  }
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function money(v) { return v === undefined ? "—" : "$" + v.toFixed(2); }
  function duration(s) {
    if (s === undefined) return "—";
    var r = Math.round(s);
    if (r < 10) return s.toFixed(1) + " s";
    if (r < 120) return r + " s";
    if (r < 3600) return Math.floor(r / 60) + " min " + String(r % 60).padStart(2, "0") + " s";
    return Math.floor(r / 3600) + " h " + String(Math.floor(r % 3600 / 60)).padStart(2, "0") +
      " min";
  }
  function stamp(ts) {
    if (ts === undefined) return "";
    return new Date(ts * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
  }
  function clock(ts) {
    return ts === undefined ? "—" : new Date(ts * 1000).toISOString().slice(11, 19);
  }
  function words(job) {
    if (job.words === undefined) {
      var vars = job.vars || {};
      job.words = [job.id, job.prompt, job.negative, job.model, job.size, job.mode, job.status,
        job.state, job.error_code, job.error, job.task].concat(
        Object.keys(vars).map(function (k) { return vars[k]; })).filter(function (w) {
        return w !== undefined && w !== null; }).join(" ").toLowerCase();
    }
    return job.words;
  }
  function commands(node, text) {
    text.split("`").forEach(function (part, n) {
      node.appendChild(n % 2 ? el("code", "", part) : document.createTextNode(part));
    });
    return node;
  }
  function source(thumb, path, label) {
    var fig = el("figure", "source");
    fig.title = path;
    if (thumb) {
      var img = el("img");
      img.loading = "lazy";
      img.alt = label;
      img.src = thumb;
      fig.appendChild(img);
    } else {
      fig.appendChild(el("span", "nothumb", path.split("/").pop()));
    }
    fig.appendChild(el("figcaption", "", label));
    return fig;
  }
  function card(i) {
    var job = jobs[i], st = job.status;
    var art = el("article", "card st-" + st);
    art.id = "card-" + i;
    art.dataset.job = job.id;
    art.dataset.status = st;
    var media = el("div", "media");
    var ratio = /^(\d+):(\d+)$/.exec(job.size || "");
    if (ratio) media.style.aspectRatio = ratio[1] + " / " + ratio[2];
    if (job.video) {
      var video = el("video");
      ["controls", "muted", "playsinline"].forEach(function (a) { video.setAttribute(a, ""); });
      video.muted = true;
      video.preload = "metadata";
      video.src = job.video;
      // The file has the last word on the shape: the frame matches the clip, never boxed.
      video.addEventListener("loadedmetadata", function () {
        if (video.videoWidth && video.videoHeight) {
          media.style.aspectRatio = video.videoWidth + " / " + video.videoHeight;
        }
      });
      media.appendChild(video);
    } else {
      var ph = el("div", "placeholder");
      ph.appendChild(el("span", "", job.note || "no video"));
      media.appendChild(ph);
    }
    var label = st.replace("_", " ");
    if (st === "pending" && job.state !== "pending") label += " · " + job.state;
    media.appendChild(el("span", "badge st-" + st, (GLYPH[st] || "") + " " + label));
    art.appendChild(media);
    var body = el("div", "body");
    body.appendChild(el("h3", "", job.id));
    var chips = el("div", "vars"), vars = job.vars || {};
    dims.forEach(function (d) {
      if (d.key.indexOf("var:") !== 0 || vars[d.label] === undefined) return;
      var chip = el("span", "var");
      chip.title = d.label + ": " + vars[d.label];
      chip.appendChild(el("i", "", d.label));
      chip.appendChild(document.createTextNode(" " + vars[d.label]));
      chips.appendChild(chip);
    });
    body.appendChild(chips);
    if (job.image) {
      var sources = el("div", "sources");
      sources.appendChild(source(job.thumb, job.image, job.image_tail ? "first frame" : "image"));
      if (job.image_tail) {
        sources.appendChild(el("span", "arrow", "→"));
        sources.appendChild(source(job.thumb_tail, job.image_tail, "last frame"));
      }
      body.appendChild(sources);
    }
    var prompt = el("p", "prompt", job.prompt);
    prompt.title = "Click to expand";
    body.appendChild(prompt);
    body.appendChild(el("p", "params", [job.model, job.duration + " s", job.size, job.mode,
      KIND[job.kind] || job.kind].filter(Boolean).join(" · ")));
    if (job.error_code || job.error) {
      var error = el("div", "error");
      error.appendChild(el("b", "", job.error_code || "error"));
      error.appendChild(document.createTextNode(" " + (job.error || "")));
      body.appendChild(error);
    }
    if (job.next) body.appendChild(commands(el("p", "next-step", "Next: "), job.next));
    var dl = el("dl", "meta");
    [["Cost", money(job.cost), ""], ["Render", duration(job.render), ""],
      ["Attempts", String(job.attempts || 0), ""],
      ["Submitted", clock(job.submitted), stamp(job.submitted)]].forEach(function (m) {
      var div = el("div");
      div.appendChild(el("dt", "", m[0]));
      var dd = el("dd", "", m[1]);
      dd.title = m[2];
      div.appendChild(dd);
      dl.appendChild(div);
    });
    body.appendChild(dl);
    var details = el("details"), extra = el("dl");
    details.appendChild(el("summary", "", "Details"));
    [["negative prompt", job.negative], ["image", job.image], ["last frame", job.image_tail],
      ["task id", job.task], ["state", job.state], ["completed", stamp(job.completed)],
      ["progress", job.progress === undefined ? "" : Math.round(job.progress * 100) + "%"],
      ["video", job.signed ? "" : job.video], ["stored as", job.stored_uri],
      ["id template", job.group]].concat(
      Object.keys(vars).map(function (k) { return [k, vars[k]]; })).forEach(function (pair) {
      if (!pair[1]) return;
      extra.appendChild(el("dt", "", pair[0]));
      extra.appendChild(el("dd", "", String(pair[1])));
    });
    details.appendChild(extra);
    body.appendChild(details);
    art.appendChild(body);
    return art;
  }
  function cardFor(i) {
    if (!cards[i]) cards[i] = card(i);
    return cards[i];
  }
  function heading(g) {
    var d = dim(group.value), h = el("h2");
    h.appendChild(document.createTextNode(d ? d.label + ": " + g.name : "All jobs"));
    if (d && d.aliases.length) {
      var first = jobs[g.members[0]].vars || {};
      h.appendChild(el("small", "", d.aliases.map(function (a) {
        return first[a]; }).filter(Boolean).join(" · ")));
    }
    var n = g.members.length;
    h.appendChild(el("small", "", n + (n === g.total ? "" : " of " + g.total) +
      (n === 1 ? " job" : " jobs")));
    order.forEach(function (s) {
      if (g.tally[s]) h.appendChild(el("span", "badge st-" + s, g.tally[s] + " " +
        s.replace("_", " ")));
    });
    return h;
  }
  function fill(n) {
    while (n > 0 && at.g < plan.length) {
      var g = plan[at.g];
      if (!g.grid) {
        var section = el("section", "group");
        g.grid = el("div", "grid");
        section.appendChild(heading(g));
        section.appendChild(g.grid);
        main.appendChild(section);
      }
      while (n > 0 && at.i < g.members.length) {
        g.grid.appendChild(cardFor(g.members[at.i]));
        at.i += 1;
        n -= 1;
        drawn += 1;
      }
      if (at.i >= g.members.length) { at.g += 1; at.i = 0; }
    }
    more.hidden = drawn >= shown;
    moreButton.textContent = "Show more (" + drawn + " of " + shown + " shown)";
  }
  function render() {
    var terms = q.value.toLowerCase().split(/\s+/).filter(Boolean);
    var wanted = {};
    boxes.forEach(function (b) { wanted[b.value] = b.checked; });
    var key = group.value, by = sort.value, groups = new Map();
    var idx = jobs.map(function (_, i) { return i; });
    if (key === "status") {
      idx.sort(function (a, b) { return value(jobs[a], "status") - value(jobs[b], "status"); });
    }
    idx.forEach(function (i) {
      var job = jobs[i], g = key ? value(job, key) : "";
      if (key === "status") g = job.status;
      g = g === null ? "(none)" : String(g);
      if (!groups.has(g)) groups.set(g, {name: g, members: [], total: 0, tally: {}});
      var entry = groups.get(g);
      entry.total += 1;
      if (wanted[job.status] !== false && terms.every(function (t) {
        return words(job).indexOf(t) >= 0; })) {
        entry.members.push(i);
        entry.tally[job.status] = (entry.tally[job.status] || 0) + 1;
      }
    });
    plan = [];
    shown = 0;
    groups.forEach(function (g) {
      if (!g.members.length) return;
      g.members.sort(function (a, b) {
        var c = compare(value(jobs[a], by), value(jobs[b], by));
        if (descending) c = -c;
        return c || jobs[a].seq - jobs[b].seq;
      });
      shown += g.members.length;
      plan.push(g);
    });
    main.replaceChildren();
    at = {g: 0, i: 0};
    drawn = 0;
    fill(PAGE);
    document.getElementById("empty").hidden = shown > 0;
    document.getElementById("shown").textContent = "showing " + shown + " of " + jobs.length;
    dir.textContent = descending ? "↓" : "↑";
    document.body.style.setProperty("--card", zoom.value + "px");
    var state = new URLSearchParams();
    if (q.value) state.set("q", q.value);
    if (key !== meta.group) state.set("group", key);
    if (by !== "seq") state.set("sort", by);
    if (descending) state.set("desc", "1");
    if (zoom.value !== zoom.defaultValue) state.set("size", zoom.value);
    var off = boxes.filter(function (b) { return !b.checked; }).map(function (b) {
      return b.value; });
    if (off.length) state.set("hide", off.join(","));
    var hash = state.toString();
    if (hash !== location.hash.slice(1)) {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    }
  }
  function restore() {
    var state = new URLSearchParams(location.hash.slice(1));
    function pick(select, v) {
      if (v !== null && Array.prototype.some.call(select.options,
          function (o) { return o.value === v; })) select.value = v;
    }
    q.value = state.get("q") || "";
    pick(group, state.get("group"));
    pick(sort, state.get("sort"));
    descending = state.get("desc") === "1";
    zoom.value = state.get("size") || zoom.defaultValue;
    var off = (state.get("hide") || "").split(",");
    boxes.forEach(function (b) { b.checked = off.indexOf(b.value) < 0; });
  }
  q.addEventListener("input", render);
  group.addEventListener("change", render);
  sort.addEventListener("change", render);
  zoom.addEventListener("input", render);
  boxes.forEach(function (b) { b.addEventListener("change", render); });
  dir.addEventListener("click", function () { descending = !descending; render(); });
  moreButton.addEventListener("click", function () { fill(PAGE); });
  Array.prototype.forEach.call(document.querySelectorAll(".reason"), function (b) {
    b.addEventListener("click", function () {
      q.value = b.getAttribute("data-query");
      boxes.forEach(function (x) { x.checked = x.value === b.getAttribute("data-status"); });
      render();
      main.scrollIntoView({behavior: "smooth"});
    });
  });
  main.addEventListener("click", function (ev) {
    var t = ev.target;
    if (t instanceof Element && t.classList.contains("prompt")) t.classList.toggle("open");
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "/" && document.activeElement !== q) { ev.preventDefault(); q.focus(); }
  });
  if ("IntersectionObserver" in window) {
    // Cards are drawn a screenful ahead of the reader: a 100,000-job page opens at once.
    var watcher = new IntersectionObserver(function (entries) {
      if (entries.some(function (e) { return e.isIntersecting; })) {
        fill(PAGE);
        watcher.unobserve(more);
        watcher.observe(more);
      }
    }, {rootMargin: "1200px 0px"});
    watcher.observe(more);
  }
  restore();
  render();
  document.body.setAttribute("data-ready", "1");
})();
"""

#: Only this page's own script may run; the JSON blocks are data and are never executed.
CSP = (
    "script-src 'sha256-"
    + base64.b64encode(hashlib.sha256(JS.encode()).digest()).decode()
    + "'; object-src 'none'; base-uri 'none'; form-action 'none'; connect-src 'none'"
)
