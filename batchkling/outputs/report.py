"""The contact sheet: ``report.html``, one card per job, a self-contained view of the store.

The page needs no network: CSS and JS are inline and videos are referenced by a path relative to
the run folder (``videos/<job_id>.mp4``), so the folder can be zipped and sent as it is. Videos
kept only in an object store (``output.store``) play from pre-signed links made when the page is
written; the page says when they expire, and ``batchkling report`` makes fresh ones. Every
text from the database (prompts, provider error messages) is untrusted and escaped; the data the
script sorts and filters on travels as a JSON blob in which ``<``, ``>`` and ``&`` are escaped.
A Content-Security-Policy admits only the page's own script (by hash), so markup that did slip
through escaping still could not run.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread

from batchkling.errors import BatchklingError
from batchkling.models import JobSpec, StoreURL
from batchkling.outputs.atomic import atomic_text
from batchkling.outputs.objectstore import ObjectStore, key_of
from batchkling.outputs.results import csv_status
from batchkling.store import JobRow, RunRow, Store

#: The CSV's status vocabulary, in the order the page lists it.
STATUSES = ("succeeded", "failed", "timed_out", "unknown", "pending", "skipped")
_GLYPH = {"succeeded": "✓", "failed": "✕", "timed_out": "◷", "unknown": "?", "pending": "…",
          "skipped": "–"}
_KIND = {"text": "text → video", "image": "image → video", "first-last": "first + last frame"}
#: Job fields a person may group or sort by when the manifest did not name them as variables.
_PARAMS = ("model", "duration", "size", "mode", "kind")


async def write_report(store: Store, run_id: str, dest: Path, *,
                       objects: ObjectStore | None = None,
                       env: Mapping[str, str] | None = None) -> Path:
    """Render the run's contact sheet to ``dest`` atomically and return ``dest``.

    Only reads the store, so it is safe while another process is running the batch. Videos in
    an object store are linked through pre-signed URLs signed with ``objects`` (default: the
    run's ``output.store`` with the credentials of ``env``, the process environment).
    """
    run = await store.require_run(run_id)
    download = run.downloads
    spent, _ = await store.money(run_id)
    rows = [job_record(row, download=download) async for row in store.iter_jobs(run_id)]
    signed, expires = await _sign_links(run, rows, objects, env)

    def finish() -> Path:
        for record in rows:
            uri = record["stored_uri"]
            record.update(_video_link(record.pop("stored_video"), dest.parent, uri,
                                      signed.get(uri or "")))
        with atomic_text(dest) as fh:
            fh.write(render_report(run, rows, spent=spent, links_expire=expires))
        return dest

    return await anyio.to_thread.run_sync(finish)


def job_record(row: JobRow, *, download: bool) -> dict[str, Any]:
    """The few fields of one job the page shows; ``stored_video`` is the path as recorded."""
    spec: JobSpec = row.spec
    return {
        "job_id": row.job_id, "seq": row.seq, "state": row.state.value,
        "status": csv_status(row.state, download=download),
        "model": spec.model, "prompt": spec.prompt, "negative_prompt": spec.negative_prompt,
        "duration": spec.duration, "size": spec.size, "mode": spec.mode,
        "kind": spec.kind.value, "image": spec.image, "image_tail": spec.image_tail,
        "variables": dict(spec.variables), "group": spec.group,
        "attempts": row.attempt, "task_id": row.task_id, "progress": row.progress,
        "cost_usd": row.cost_usd, "error_code": row.error_code,
        "error_message": row.error_message, "submitted_at": row.submitted_at,
        "completed_at": row.completed_at, "render_seconds": row.render_seconds,
        "stored_video": row.video_path, "stored_uri": row.video_uri,
    }


async def _sign_links(run: RunRow, rows: list[dict[str, Any]], objects: ObjectStore | None,
                      env: Mapping[str, str] | None) -> tuple[dict[str, str], float | None]:
    """Pre-signed links for the videos kept only in the object store, and when they expire."""
    uris = [r["stored_uri"] for r in rows if r["stored_uri"] and not r["stored_video"]]
    if not uris:
        return {}, None
    try:
        output = json.loads(run.config_json).get("output") or {}
        if objects is None:
            objects = ObjectStore.from_output(output, env)
        if objects is None:
            return {}, None
        seconds = min(float(output.get("link_expiry") or 86400), 7 * 86400.0)
        keys = [(uri, key_of(uri, objects.where)) for uri in uris]
        wanted = [(uri, key) for uri, key in keys if key is not None]
        urls = await objects.presign([key for _, key in wanted], timedelta(seconds=seconds))
    except (BatchklingError, ValueError):
        # No credentials here, say: the cards name the objects instead of playing them.
        return {}, None
    return dict(zip([uri for uri, _ in wanted], urls, strict=True)), time.time() + seconds


def _video_link(stored: str | None, run_dir: Path, uri: str | None = None,
                signed: str | None = None) -> dict[str, Any]:
    """``video`` (a URL relative to the run folder, else a pre-signed link to the object, then
    ``signed``) or ``video_note`` saying why there is none."""
    if stored:
        path = Path(stored)
        # A relative path was recorded relative to the runner's working directory; the run
        # folder may have moved since, so the conventional place inside it is tried as well.
        candidates = [path] if path.is_absolute() else [path, run_dir / path]
        candidates.append(run_dir / "videos" / path.name)
        for candidate in candidates:
            if candidate.is_file():
                rel = os.path.relpath(candidate, run_dir).replace(os.sep, "/")
                return {"video": quote(rel), "video_note": None}
    if signed:
        return {"video": signed, "video_note": None, "signed": True}
    if uri:
        return {"video": None, "video_note": f"in {uri} (no credentials here to sign a link)"}
    if not stored:
        return {"video": None, "video_note": None}
    return {"video": None, "video_note": "video file missing"}


# ---- rendering ---------------------------------------------------------------------------


def render_report(
    run: RunRow,
    rows: list[dict[str, Any]],
    *,
    spent: float | None = None,
    generated_at: float | None = None,
    links_expire: float | None = None,
) -> str:
    """The whole page for ``rows`` (as made by :func:`job_record` plus ``video``/``video_note``).

    ``spent`` is the run's total cost including earlier attempts (default: the jobs' costs).
    ``links_expire``: when the pre-signed video links expire, if any video plays from one.
    """
    generated_at = time.time() if generated_at is None else generated_at
    dims, constants = _dimensions(rows)
    default_group = next((d["key"] for d in dims if d["key"].startswith("var:")), "")
    total = sum(r["cost_usd"] or 0.0 for r in rows) if spent is None else spent
    data = {
        "dims": dims,
        "group": default_group,
        "statuses": list(STATUSES),
        "jobs": [_job_data(r) for r in rows],
    }
    cards_by_group: dict[str, list[str]] = {}
    for i, r in enumerate(rows):
        key = _dim_value(r, default_group) if default_group else ""
        cards_by_group.setdefault(key, []).append(_card(i, r, dims))
    title = f"{run.run_id} · batchkling report"
    parts = [
        "<!doctype html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        _header(run, rows, total, constants, generated_at),
        _links_note(run, links_expire),
        _controls(rows, dims, default_group),
        '<main id="groups">',
    ]
    label = next((d["label"] for d in dims if d["key"] == default_group), "")
    for key, cards in cards_by_group.items():
        heading = f"{_e(label)}: {_e(key)}" if default_group else "All jobs"
        parts.append(f'<section class="group"><h2>{heading} <small>{len(cards)}</small></h2>'
                     f'<div class="grid">{"".join(cards)}</div></section>')
    parts += [
        "</main>",
        '<p id="empty" hidden>No job matches these filters.</p>',
        f'<script type="application/json" id="report-data">{_json_for_script(data)}</script>',
        f"<script>{_JS}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts)


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _json_for_script(data: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>``, ``<!--`` or entity can end it early."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _dim_value(record: dict[str, Any], key: str) -> str:
    kind, _, name = key.partition(":")
    value = record["variables"].get(name) if kind == "var" else record.get(name)
    return "(none)" if value is None else str(value)


def _dimensions(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """What the page can group and sort by, and the variables every job shares.

    A variable that only restates an earlier one (a product's name next to its id) is folded
    into it as an alias, so the controls and cards offer one choice per real axis.
    """
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r["variables"]))
    keys = [f"var:{n}" for n in names] + [f"param:{p}" for p in _PARAMS if p not in names]
    columns = {k: [_dim_value(r, k) for r in rows] for k in keys}
    dims: list[dict[str, Any]] = []
    constants: dict[str, str] = {}
    for key in keys:
        values = columns[key]
        label = key.partition(":")[2]
        if len(set(values)) < 2:
            if key.startswith("var:") and values:
                constants[label] = values[0]
            continue
        owner = next((d for d in dims if _same_partition(columns[d["key"]], values)), None)
        if owner is not None and key.startswith("var:"):
            owner["aliases"].append(label)
            continue
        if owner is None:
            dims.append({"key": key, "label": label, "aliases": []})
    dims.append({"key": "status", "label": "status", "aliases": []})
    return dims, constants


def _same_partition(a: list[str], b: list[str]) -> bool:
    """True when two columns split the jobs the same way (a one-to-one mapping of values)."""
    return len(set(a)) == len(set(b)) == len(set(zip(a, b, strict=True)))


def _job_data(r: dict[str, Any]) -> dict[str, Any]:
    """What the script needs per job to filter, sort and group (cards carry the rest)."""
    words = [r["job_id"], r["prompt"], r["negative_prompt"], r["model"], r["size"], r["mode"],
             r["status"], r["state"], r["error_code"], r["error_message"], r["task_id"],
             *r["variables"].values()]
    return {
        "id": r["job_id"], "seq": r["seq"], "status": r["status"], "vars": r["variables"],
        "model": r["model"], "duration": r["duration"], "size": r["size"], "mode": r["mode"],
        "kind": r["kind"], "cost": r["cost_usd"], "render": r["render_seconds"],
        "text": " ".join(str(w) for w in words if w is not None).lower(),
    }


def _card(index: int, r: dict[str, Any], dims: list[dict[str, Any]]) -> str:
    status = r["status"]
    if r.get("video"):
        media = (f'<video controls muted playsinline preload="metadata" '
                 f'src="{_e(r["video"])}"></video>')
    else:
        media = f'<div class="placeholder"><span>{_e(_placeholder_text(r))}</span></div>'
    chips = "".join(
        f'<span class="var" title="{_e(d["label"])}: {_e(v)}"><i>{_e(d["label"])}</i> {_e(v)}'
        "</span>"
        for d in dims if d["key"].startswith("var:")
        for v in [r["variables"].get(d["label"])] if v is not None
    )
    params = " · ".join(_e(p) for p in (
        r["model"], f"{r['duration']} s", r["size"], r["mode"], _KIND.get(r["kind"], r["kind"]),
    ) if p)
    # "pending" covers several states; the others say all there is to say.
    label = status.replace("_", " ")
    if status == "pending" and r["state"] != "pending":
        label += f" · {r['state']}"
    error = ""
    if r["error_code"] or r["error_message"]:
        error = (f'<div class="error"><b>{_e(r["error_code"] or "error")}</b> '
                 f'{_e(r["error_message"] or "")}</div>')
    meta = [
        ("Cost", _money(r["cost_usd"]), ""),
        ("Render", _duration(r["render_seconds"]), ""),
        ("Attempts", str(r["attempts"]), ""),
        ("Submitted", _clock(r["submitted_at"]), _stamp(r["submitted_at"])),
    ]
    meta_html = "".join(f'<div><dt>{k}</dt><dd title="{_e(t)}">{_e(v)}</dd></div>'
                        for k, v, t in meta)
    extra = [
        ("negative prompt", r["negative_prompt"]), ("image", r["image"]),
        ("last frame", r["image_tail"]), ("task id", r["task_id"]), ("state", r["state"]),
        ("completed", _stamp(r["completed_at"])),
        ("progress", None if r["progress"] is None else f"{r['progress']:.0%}"),
        ("video", None if r.get("signed") else r.get("video")),
        ("stored as", r.get("stored_uri")),
        ("id template", r["group"]),
        *((k, v) for k, v in r["variables"].items()),
    ]
    extra_html = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in extra if v)
    return (
        f'<article class="card st-{_e(status)}" id="card-{index}" data-job="{_e(r["job_id"])}"'
        f' data-status="{_e(status)}">'
        f'<div class="media">{media}'
        f'<span class="badge st-{_e(status)}">{_GLYPH.get(status, "")} {_e(label)}</span></div>'
        f'<div class="body"><h3>{_e(r["job_id"])}</h3>'
        f'<div class="vars">{chips}</div>'
        f'<p class="prompt" title="Click to expand">{_e(r["prompt"])}</p>'
        f'<p class="params">{params}</p>{error}'
        f'<dl class="meta">{meta_html}</dl>'
        f"<details><summary>Details</summary><dl>{extra_html}</dl></details>"
        "</div></article>"
    )


def _placeholder_text(r: dict[str, Any]) -> str:
    if r.get("video_note"):
        return str(r["video_note"])
    status, state = r["status"], r["state"]
    if status == "succeeded":
        return "rendered, not downloaded"
    if status == "pending":
        if r["progress"] is not None and state == "running":
            return f"rendering · {r['progress']:.0%}"
        return {"pending": "waiting to start", "succeeded": "rendered, downloading"}.get(
            state, f"{state}…")
    return {"failed": "no video: failed", "timed_out": "no video yet: timed out",
            "unknown": "no video: outcome unknown", "skipped": "skipped"}.get(status, "no video")


def _header(
    run: RunRow, rows: list[dict[str, Any]], total: float, constants: dict[str, str],
    generated_at: float,
) -> str:
    counts = {s: 0 for s in STATUSES}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    running = run.lease_owner is not None
    state = "running" if running else run.state
    tiles = [("Jobs", str(len(rows)), ""), ("Cost", _money(total) if rows else "—", ""),
             ("Wall time", _duration(_span(run, rows)), "first submit to last finish")]
    tiles_html = "".join(f'<div class="tile" title="{_e(t)}"><span>{_e(k)}</span>'
                         f"<b>{_e(v)}</b></div>" for k, v, t in tiles)
    bar = "".join(f'<i class="st-{s}" style="flex:{n}" title="{n} {s}"></i>'
                  for s, n in counts.items() if n)
    reasons = _reasons(rows)
    reasons_html = ""
    if reasons:
        items = "".join(
            f'<li><button type="button" class="reason" data-status="{_e(s)}"'
            f' data-query="{_e(code)}"><b>{n} ×</b> <span class="badge st-{_e(s)}">{_e(s)}</span>'
            f" <code>{_e(code or 'no code')}</code> <span>{_e(msg or '')}</span></button></li>"
            for (s, code), (n, msg) in reasons
        )
        reasons_html = f'<div class="reasons"><h2>Problems by reason</h2><ul>{items}</ul></div>'
    shared = ""
    if constants:
        shared = '<p class="shared">Every job: ' + " · ".join(
            f"<i>{_e(k)}</i> {_e(v)}" for k, v in constants.items()) + "</p>"
    provider = _e(run.provider) + (" (simulated)" if run.simulated else "")
    live = (f'<p class="live">This run is still going: a snapshot taken '
            f"{_e(_stamp(generated_at))}.</p>" if running else "")
    stop = f" · stopped: {_e(run.stop_reason)}" if run.stop_reason else ""
    return (
        "<header class=\"top\">"
        f'<div class="title"><h1>{_e(run.run_id)}</h1>'
        f'<span class="runstate">{_e(state)}</span></div>'
        f'<p class="sub">{provider} · manifest {_e(run.manifest_path or "—")}'
        f" · started {_e(_stamp(run.created_at))}{stop}"
        f" · report {_e(_stamp(generated_at))}</p>{live}"
        f'<div class="summary">{tiles_html}</div>'
        f'<div class="bar">{bar}</div>{shared}{reasons_html}'
        "</header>"
    )


def _links_note(run: RunRow, expires: float | None) -> str:
    if expires is None:
        return ""
    try:
        store = StoreURL.parse(str(json.loads(run.config_json)["output"]["store"])).uri()
    except (ValueError, KeyError, TypeError):
        store = "the object store"
    return (f'<p class="links">Videos play from {_e(store)} through links that expire '
            f"{_e(_stamp(expires))}; <code>batchkling report {_e(run.run_id)}</code> writes "
            "fresh ones.</p>")


def _controls(rows: list[dict[str, Any]], dims: list[dict[str, Any]], group: str) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    chips = "".join(
        f'<label class="chip st-{s}"><input type="checkbox" name="status" value="{s}" checked>'
        f'{_GLYPH[s]} {s.replace("_", " ")} <b>{counts[s]}</b></label>'
        for s in STATUSES if counts.get(s)
    )

    def options(choices: Iterable[tuple[str, str]], selected: str) -> str:
        return "".join(f'<option value="{_e(k)}"{" selected" if k == selected else ""}>'
                       f"{_e(v)}</option>" for k, v in choices)

    dim_choices = [(d["key"], d["label"]) for d in dims]
    group_opts = options([("", "nothing"), *dim_choices], group)
    sort_opts = options([("seq", "manifest order"), *dim_choices, ("cost", "cost"),
                         ("render", "render time"), ("id", "job id")], "seq")
    return (
        '<nav class="controls">'
        '<input type="search" id="q" placeholder="Search prompt, id, error… ( / )"'
        ' aria-label="Search">'
        f'<div class="chips" role="group" aria-label="Status">{chips}</div>'
        f'<label>Group by <select id="group">{group_opts}</select></label>'
        f'<label>Sort by <select id="sort">{sort_opts}</select></label>'
        '<button type="button" id="dir" title="Reverse the order">↑</button>'
        '<label>Card size <input type="range" id="zoom" min="160" max="480" step="20"'
        ' value="220"></label>'
        '<span id="shown"></span>'
        "</nav>"
    )


def _reasons(rows: list[dict[str, Any]]) -> list[tuple[tuple[str, str], tuple[int, str]]]:
    """Problems by ``(status, error code)``, most frequent first, with one sample message."""
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for r in rows:
        if r["status"] in ("failed", "timed_out", "unknown") or r["error_code"]:
            key = (r["status"], r["error_code"] or "")
            n, msg = found.get(key, (0, r["error_message"] or ""))
            found[key] = (n + 1, msg)
    return sorted(found.items(), key=lambda kv: (-kv[1][0], kv[0]))


def _span(run: RunRow, rows: list[dict[str, Any]]) -> float | None:
    """First submit to last finish; to the latest heartbeat while the run is still going."""
    starts: list[float] = [r["submitted_at"] for r in rows if r["submitted_at"] is not None]
    ends: list[float] = [r["completed_at"] for r in rows if r["completed_at"] is not None]
    if run.lease_owner is not None:
        ends.append(run.lease_heartbeat or run.updated_at)
    if not starts or not ends:
        return None
    return max(0.0, max(ends) - min(starts))


def _money(value: float | None) -> str:
    return "—" if value is None else f"${value:,.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 10:
        return f"{seconds:.1f} s"
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _stamp(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _clock(ts: float | None) -> str:
    return "—" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


_CSS = """
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
.live{background:var(--wait-bg);color:var(--wait);padding:6px 10px;border-radius:6px}
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
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--card,220px),1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-top:4px solid var(--c);
border-radius:10px;overflow:hidden;display:flex;flex-direction:column;
box-shadow:0 1px 2px rgba(31,35,40,.06)}
.media{height:calc(var(--card,220px) * .8);background:#1f2328;display:flex;align-items:center;
justify-content:center;position:relative}
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
"""

_JS = """
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var jobs = data.jobs, dims = data.dims, order = data.statuses;
  var cards = jobs.map(function (_, i) { return document.getElementById("card-" + i); });
  var main = document.getElementById("groups");
  var q = document.getElementById("q"), group = document.getElementById("group");
  var sort = document.getElementById("sort"), dir = document.getElementById("dir");
  var zoom = document.getElementById("zoom");
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input[name=status]"));
  var descending = false;
  function dim(key) { return dims.filter(function (d) { return d.key === key; })[0]; }
  function value(job, key) {
    if (key === "seq") return job.seq;
    if (key === "id") return job.id;
    if (key === "status") return order.indexOf(job.status);
    if (key === "cost") return job.cost;
    if (key === "render") return job.render;
    var parts = key.split(":"), v = parts[0] === "var" ? job.vars[parts[1]] : job[parts[1]];
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
  function render() {
    var terms = q.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var wanted = {};
    boxes.forEach(function (b) { wanted[b.value] = b.checked; });
    var key = group.value, by = sort.value, groups = new Map(), shown = 0;
    var idx = jobs.map(function (_, i) { return i; });
    if (key === "status") {
      idx.sort(function (a, b) { return value(jobs[a], "status") - value(jobs[b], "status"); });
    }
    idx.forEach(function (i) {
      var job = jobs[i], g = key ? value(job, key) : "";
      if (key === "status") g = job.status;
      g = g === null ? "(none)" : String(g);
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(i);
    });
    var frag = document.createDocumentFragment(), d = dim(key);
    groups.forEach(function (members, name) {
      members.sort(function (a, b) {
        var c = compare(value(jobs[a], by), value(jobs[b], by));
        if (descending) c = -c;
        return c || jobs[a].seq - jobs[b].seq;
      });
      var section = el("section", "group"), h = el("h2"), grid = el("div", "grid"), n = 0;
      var tally = {};
      members.forEach(function (i) {
        var job = jobs[i], visible = wanted[job.status] !== false && terms.every(
          function (t) { return job.text.indexOf(t) >= 0; });
        cards[i].hidden = !visible;
        if (visible) { n += 1; tally[job.status] = (tally[job.status] || 0) + 1; }
        grid.appendChild(cards[i]);
      });
      h.appendChild(document.createTextNode(d ? d.label + ": " + name : "All jobs"));
      if (d && d.aliases.length) {
        var first = jobs[members[0]];
        h.appendChild(el("small", "", d.aliases.map(function (a) {
          return first.vars[a]; }).filter(Boolean).join(" · ")));
      }
      h.appendChild(el("small", "", n + (n === members.length ? "" : " of " + members.length) +
        (n === 1 ? " job" : " jobs")));
      order.forEach(function (s) {
        if (tally[s]) h.appendChild(el("span", "badge st-" + s, tally[s] + " " +
          s.replace("_", " ")));
      });
      section.appendChild(h);
      section.appendChild(grid);
      section.hidden = n === 0;
      shown += n;
      frag.appendChild(section);
    });
    main.replaceChildren(frag);
    document.getElementById("empty").hidden = shown > 0;
    document.getElementById("shown").textContent = "showing " + shown + " of " + jobs.length;
    dir.textContent = descending ? "↓" : "↑";
    document.body.style.setProperty("--card", zoom.value + "px");
    var state = new URLSearchParams();
    if (q.value) state.set("q", q.value);
    if (key !== data.group) state.set("group", key);
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
  restore();
  render();
})();
"""

#: Only this page's own script may run; the JSON blob is data and is never executed.
_CSP = (
    "script-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    + "'; object-src 'none'; base-uri 'none'; form-action 'none'; connect-src 'none'"
)

__all__ = ["job_record", "render_report", "write_report"]
