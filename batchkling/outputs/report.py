"""The contact sheet: ``report.html``, one card per job, a self-contained view of the store.

The page needs no network: CSS and JS are inline, videos are referenced by a path relative to
the run folder (``videos/<job_id>.mp4``) and source images by small thumbnails made next to it
(``thumbs/<sha>.jpg``), so the folder can be zipped and sent as it is. Videos kept only in an
object store (``output.store``) play from pre-signed links made when the page is written; the
page says when they expire, and ``batchkling report`` makes fresh ones.

It is written by streaming: one pass over the store a page at a time fills the job data (JSON
blocks of :data:`CHUNK` jobs, spooled to a temporary file) and the summary's tallies; then the
page is assembled — summary first, data, script — and renamed into place. Memory holds one page
of jobs and the tallies, never the run or the page, so a 100,000-job run writes in seconds. The
browser draws cards a screenful at a time as the reader scrolls, so such a page opens at once.

Every text from the database (prompts, provider error messages) is untrusted: the HTML written
here escapes it, the script builds cards with ``textContent``, and the JSON blocks escape
``<``, ``>`` and ``&``. A Content-Security-Policy admits only the page's own script (by hash).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import anyio.to_thread

from batchkling.errors import BatchklingError
from batchkling.models import StoreURL
from batchkling.outputs.atomic import atomic_text, create_temp
from batchkling.outputs.nextstep import job_next_step, location_args, next_steps
from batchkling.outputs.objectstore import ObjectStore, key_of
from batchkling.outputs.report_assets import CSP, CSS, JS
from batchkling.outputs.results import ResultsWriter, csv_status
from batchkling.store import JobRow, RunRow, Store

#: The CSV's status vocabulary, in the order the page lists it.
STATUSES = ("succeeded", "failed", "timed_out", "unknown", "pending", "skipped")
_GLYPH = {"succeeded": "✓", "failed": "✕", "timed_out": "◷", "unknown": "?", "pending": "…",
          "skipped": "–"}
#: Job fields a person may group or sort by when the manifest did not name them as variables.
_PARAMS = ("model", "duration", "size", "mode", "kind")
#: Jobs per JSON block: the unit of the spool and of the script's parsing.
CHUNK = 1000
#: A dimension with more values than this is offered for sorting, not for grouping (a section
#: per value would be a page of headings), and its values are no longer tracked.
MAX_GROUPS = 200
#: New thumbnails made per write; later source images show as their path (a run whose every
#: job has its own image would otherwise spend minutes in Pillow).
MAX_NEW_THUMBS = 500
THUMB_PX = 240
_NONE = "(none)"
#: What the header says about each run state.
_STATE_NOTE = {
    "running": "This run is still going: a snapshot taken {at}.",
    "interrupted": "This run was interrupted: its process stopped before every job ended. "
                   "Tasks already created keep rendering; the next steps below pick them up.",
    "incomplete": "This run stopped with jobs left to do.",
    "stopped": "Creates stopped: the provider refused the account.",
}


async def write_report(
    store: Store,
    run_id: str,
    dest: Path,
    *,
    state: str | None = None,
    exit_code: int | None = None,
    stop_kind: str | None = None,
    workdir: Path | None = None,
    now: float | None = None,
    objects: ObjectStore | None = None,
    env: Mapping[str, str] | None = None,
    results: ResultsWriter | None = None,
) -> Path:
    """Render the run's contact sheet to ``dest`` atomically and return ``dest``.

    Only reads the store, so it is safe while another process is running the batch. ``state``,
    ``exit_code`` and ``stop_kind`` say how the run just ended, from the process that ran it
    (which still holds the lease); without them the page goes by the lease and the store, as
    ``status`` does. ``workdir`` is where the hinted commands look for the store. Videos in an
    object store are linked through pre-signed URLs signed with ``objects`` (default: the run's
    ``output.store`` with the credentials of ``env``, the process environment). ``results`` is
    fed the same pages, so the end of a run reads its jobs once for the CSV and the page; once
    this returns, every job has gone to it (``results.finish()`` writes the CSV).
    """
    from batchkling.outputs.views import run_outcome

    run = await store.require_run(run_id)
    now = time.time() if now is None else now
    shown, outcome = await run_outcome(store, run, workdir=workdir, now=now, state=state,
                                       exit_code=exit_code, stop_kind=stop_kind)
    spent, _ = await store.money(run_id)
    sheet = ContactSheet(run, dest.parent, download=run.downloads,
                         where=location_args(workdir), live=shown == "running")

    def open_spool() -> tuple[TextIO, Path]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, path = create_temp(dest.parent, "report-data", ".part")
        return os.fdopen(fd, "w", encoding="utf-8"), path

    signer = _Signer(run, objects, env)

    def write(page: list[JobRow], signed: Mapping[str, str]) -> None:
        specs = [json.loads(row.spec_json) for row in page]
        sheet.add(page, spool, signed, specs)
        if results is not None:
            results.add(page, specs)

    async def add(page: list[JobRow]) -> None:
        signed = await signer.sign([r.video_uri for r in page if r.video_uri and not r.video_path])
        await anyio.to_thread.run_sync(write, page, signed)

    spool, spool_path = await anyio.to_thread.run_sync(open_spool)
    try:
        with spool:
            async for page in store.iter_pages(run_id, page=CHUNK):
                await add(page)
        sheet.links_expire = signer.expires

        def assemble() -> Path:
            with atomic_text(dest) as out:
                out.write(sheet.head(state=shown, steps=next_steps(outcome), spent=spent,
                                     generated_at=now))
                with open(spool_path, encoding="utf-8") as data:
                    shutil.copyfileobj(data, out, 1 << 20)
                out.write(sheet.tail())
            return dest

        return await anyio.to_thread.run_sync(assemble)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(spool_path)


class _Signer:
    """Pre-signed links for the videos kept only in the object store, a page at a time."""

    def __init__(self, run: RunRow, objects: ObjectStore | None,
                 env: Mapping[str, str] | None) -> None:
        self.run, self.objects, self.env = run, objects, env
        self.expires: float | None = None
        self._broken = False

    async def sign(self, uris: list[str]) -> dict[str, str]:
        if not uris or self._broken:
            return {}
        try:
            output = json.loads(self.run.config_json).get("output") or {}
            if self.objects is None:
                self.objects = ObjectStore.from_output(output, self.env)
            if self.objects is None:
                self._broken = True
                return {}
            seconds = min(float(output.get("link_expiry") or 86400), 7 * 86400.0)
            keys = [(uri, key_of(uri, self.objects.where)) for uri in uris]
            wanted = [(uri, key) for uri, key in keys if key is not None]
            urls = await self.objects.presign([key for _, key in wanted],
                                              timedelta(seconds=seconds))
        except (BatchklingError, ValueError):
            # No credentials here, say: the cards name the objects instead of playing them.
            self._broken = True
            return {}
        self.expires = time.time() + seconds
        return dict(zip([uri for uri, _ in wanted], urls, strict=True))


def render_report(
    run: RunRow,
    rows: Iterable[JobRow],
    *,
    state: str | None = None,
    steps: Sequence[str] = (),
    spent: float | None = None,
    generated_at: float | None = None,
    run_dir: Path | None = None,
    download: bool = True,
) -> str:
    """The whole page for ``rows`` as one string (for tests and small runs; ``write_report``
    streams). ``spent`` is the run's total cost including earlier attempts (default: the
    jobs' costs); ``state`` defaults to the stored one."""
    sheet = ContactSheet(run, run_dir or Path(run.run_id), download=download, where=(),
                         live=state == "running")
    body = io.StringIO()
    sheet.add(list(rows), body)
    head = sheet.head(state=state or run.state, steps=steps,
                      spent=sheet.cost if spent is None else spent,
                      generated_at=time.time() if generated_at is None else generated_at)
    return head + body.getvalue() + sheet.tail()


class ContactSheet:
    """The page of one run, fed a page of jobs at a time; holds tallies, never the jobs."""

    def __init__(self, run: RunRow, run_dir: Path, *, download: bool, where: Sequence[str],
                 live: bool) -> None:
        self.run, self.run_dir, self.download, self.where = run, run_dir, download, where
        self.live = live
        self.total = 0
        self.cost = 0.0
        self.counts = dict.fromkeys(STATUSES, 0)
        #: (status, error code) -> [jobs, one sample message]
        self.reasons: dict[tuple[str, str], list[Any]] = {}
        self.first_submit: float | None = None
        self.last_end: float | None = None
        self.dims = _Dims()
        self._videos = _Videos(run_dir)
        self.links_expire: float | None = None  # when pre-signed video links expire
        self._thumbs: dict[str, str | None] = {}  # image sha256 -> thumb path (None: none)
        self._new_thumbs = 0

    # ---- the pass over the jobs ----------------------------------------------------------

    def add(self, rows: Sequence[JobRow], out: TextIO,
            signed: Mapping[str, str] | None = None,
            specs: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Tally ``rows`` and write their data block to ``out`` (runs in a worker thread);
        ``signed`` maps object URIs to pre-signed links; ``specs`` are the rows' stored
        requests, parsed, if the caller has them."""
        if not rows:
            return
        links = signed or {}
        # The stored request as a dict: building a JobSpec for each of 100,000 jobs costs more
        # than the page needs from it.
        if specs is None:
            specs = [json.loads(row.spec_json) for row in rows]
        records = [self._record(row, spec, links) for row, spec in zip(rows, specs, strict=True)]
        out.write('<script type="application/json" class="jobs">')
        out.write(_json_for_script(records))
        out.write("</script>\n")

    def _record(self, row: JobRow, spec: Mapping[str, Any],
                signed: Mapping[str, str]) -> dict[str, Any]:
        status = csv_status(row.state, download=self.download)
        state = row.state.value
        self.total += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        self.cost += row.cost_usd or 0.0
        if row.submitted_at is not None:
            self.first_submit = min(self.first_submit or row.submitted_at, row.submitted_at)
        if row.completed_at is not None:
            self.last_end = max(self.last_end or row.completed_at, row.completed_at)
        if status in ("failed", "timed_out", "unknown") or row.error_code:
            tally = self.reasons.setdefault((status, row.error_code or ""),
                                            [0, row.error_message or ""])
            tally[0] += 1
        image, tail = spec.get("image"), spec.get("image_tail")
        kind = "first-last" if tail else "image" if image else "text"
        variables = spec.get("variables") or {}
        self.dims.add(variables, {"model": spec["model"], "duration": spec["duration"],
                                  "size": spec["size"], "mode": spec.get("mode"),
                                  "kind": kind})
        record: dict[str, Any] = {
            "id": row.job_id, "seq": row.seq, "status": status, "state": state,
            "model": spec["model"], "duration": spec["duration"], "size": spec["size"],
            "kind": kind, "prompt": spec.get("prompt", ""), "attempts": row.attempt,
        }
        optional = {
            "vars": variables or None, "mode": spec.get("mode"),
            "negative": spec.get("negative_prompt"), "group": spec.get("group"),
            "image": image, "image_tail": tail, "task": row.task_id, "progress": row.progress,
            "cost": row.cost_usd, "render": row.render_seconds, "error_code": row.error_code,
            "error": row.error_message, "submitted": row.submitted_at,
            "completed": row.completed_at,
        }
        record.update((k, v) for k, v in optional.items() if v is not None)
        for key, path, sha in (("thumb", image, "image_sha256"),
                               ("thumb_tail", tail, "image_tail_sha256")):
            thumb = self._thumb(path, spec.get(sha))
            if thumb:
                record[key] = thumb
        video, note = self._videos.link(row.video_path)
        if video is None and row.video_uri and signed.get(row.video_uri):
            video, record["signed"] = signed[row.video_uri], True
        elif video is None and row.video_uri:
            note = f"in {row.video_uri} (no credentials here to sign a link)"
        if row.video_uri:
            record["stored_uri"] = row.video_uri
        if video:
            record["video"] = video
        else:
            record["note"] = note or _placeholder(status, state, row.progress)
        step = job_next_step(self.run.run_id, row.job_id, state, error_code=row.error_code,
                             retryable=row.retryable, where=self.where)
        if step:
            record["next"] = step
        return record

    def _thumb(self, image: str | None, sha256: str | None) -> str | None:
        """``thumbs/<sha>.jpg`` for a local image, made once per content (None: no thumbnail)."""
        if not image or not sha256:
            return None
        if sha256 in self._thumbs:
            return self._thumbs[sha256]
        name = f"thumbs/{sha256[:24]}.jpg"
        target = self.run_dir / name
        found: str | None = name
        if not target.is_file():
            if self._new_thumbs >= MAX_NEW_THUMBS or not _make_thumb(Path(image), target):
                found = None
            self._new_thumbs += 1
        self._thumbs[sha256] = found
        return found

    # ---- the page around the data --------------------------------------------------------

    def head(self, *, state: str, steps: Sequence[str], spent: float,
             generated_at: float) -> str:
        """Everything before the job data: head, summary, controls."""
        dims, constants = self.dims.finish()
        default_group = next((d["key"] for d in dims if d["key"].startswith("var:")
                              and d["groupable"]), "")
        meta = {"dims": dims, "group": default_group, "statuses": list(STATUSES),
                "total": self.total}
        title = f"{self.run.run_id} · batchkling report"
        return "\n".join([
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<link rel="icon" href="data:,">',
            f"<title>{_e(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            self._header(state, steps, spent, constants, generated_at),
            self._controls(dims, default_group),
            '<main id="groups"><p class="loading">Loading the cards…</p></main>',
            '<p id="empty" hidden>No job matches these filters.</p>',
            '<div id="more" hidden><button type="button" id="more-button">Show more</button>'
            "</div>",
            f'<script type="application/json" id="report-meta">{_json_for_script(meta)}'
            "</script>",
            "",
        ])

    def tail(self) -> str:
        """Everything after the job data: the script and the end of the page."""
        return f"<script>{JS}</script>\n</body>\n</html>\n"

    def _header(self, state: str, steps: Sequence[str], spent: float,
                constants: dict[str, str], generated_at: float) -> str:
        run = self.run
        span = None
        end = self.last_end
        if self.live:
            end = max(end or 0.0, run.lease_heartbeat or run.updated_at)
        if self.first_submit is not None and end is not None:
            span = max(0.0, end - self.first_submit)
        tiles = [("Jobs", f"{self.total:,}", ""),
                 ("Cost", _money(spent) if self.total else "—", ""),
                 ("Wall time", _duration(span), "first submit to last finish")]
        tiles_html = "".join(f'<div class="tile" title="{_e(t)}"><span>{_e(k)}</span>'
                             f"<b>{_e(v)}</b></div>" for k, v, t in tiles)
        bar = "".join(f'<i class="st-{s}" style="flex:{n}" title="{n:,} {s}"></i>'
                      for s, n in self.counts.items() if n)
        reasons = sorted(self.reasons.items(), key=lambda kv: (-kv[1][0], kv[0]))
        reasons_html = ""
        if reasons:
            items = "".join(
                f'<li><button type="button" class="reason" data-status="{_e(s)}"'
                f' data-query="{_e(code)}"><b>{n:,} ×</b> <span class="badge st-{_e(s)}">'
                f"{_e(s)}</span> <code>{_e(code or 'no code')}</code> <span>{_e(msg)}</span>"
                "</button></li>"
                for (s, code), (n, msg) in reasons
            )
            reasons_html = (f'<div class="reasons"><h2>Problems by reason</h2><ul>{items}</ul>'
                            "</div>")
        shared = ""
        if constants:
            shared = '<p class="shared">Every job: ' + " · ".join(
                f"<i>{_e(k)}</i> {_e(v)}" for k, v in constants.items()) + "</p>"
        provider = _e(run.provider) + (" (simulated)" if run.simulated else "")
        note = _STATE_NOTE.get(state, "")
        note_html = (f'<p class="note state-{_e(state)}">{_e(note.format(at=_stamp(generated_at)))}'
                     "</p>" if note else "")
        steps_html = ""
        if steps:
            steps_html = ('<div class="next"><h2>Next</h2><ul>'
                          + "".join(f"<li>{_commands(s)}</li>" for s in steps) + "</ul></div>")
        stop = f" · stopped: {_e(run.stop_reason)}" if run.stop_reason else ""
        return (
            '<header class="top">'
            f'<div class="title"><h1>{_e(run.run_id)}</h1>'
            f'<span class="runstate state-{_e(state)}" id="runstate" data-state="{_e(state)}">'
            f"{_e(state)}</span></div>"
            f'<p class="sub">{provider} · manifest {_e(run.manifest_path or "—")}'
            f" · started {_e(_stamp(run.created_at))}{stop}"
            f" · report {_e(_stamp(generated_at))}</p>{note_html}"
            f"{_links_note(run, self.links_expire)}"
            f'<div class="summary">{tiles_html}</div>'
            f'<div class="bar">{bar}</div>{shared}{steps_html}{reasons_html}'
            "</header>"
        )

    def _controls(self, dims: list[dict[str, Any]], group: str) -> str:
        chips = "".join(
            f'<label class="chip st-{s}"><input type="checkbox" name="status" value="{s}" '
            f'checked>{_GLYPH[s]} {s.replace("_", " ")} <b>{n:,}</b></label>'
            for s, n in self.counts.items() if n
        )

        def options(choices: Iterable[tuple[str, str]], selected: str) -> str:
            return "".join(f'<option value="{_e(k)}"{" selected" if k == selected else ""}>'
                           f"{_e(v)}</option>" for k, v in choices)

        groupable = [(d["key"], d["label"]) for d in dims if d["groupable"]]
        group_opts = options([("", "nothing"), *groupable], group)
        sort_opts = options([("seq", "manifest order"), *[(d["key"], d["label"]) for d in dims],
                             ("cost", "cost"), ("render", "render time"), ("id", "job id")],
                            "seq")
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


class _Dims:
    """What the page can group and sort by, learnt a job at a time in bounded memory.

    A candidate is every variable and the parameters (model, duration, size, mode, kind).
    One with a single value is a constant ("Every job: …"). A variable that splits the jobs
    exactly as an earlier dimension does (a product's name beside its id) is folded into it as
    an alias, so the controls offer one choice per real axis.
    """

    def __init__(self) -> None:
        self.keys: list[str] = []  # variables in first-seen order
        self._names: set[str] = set()  # their names
        self.values: dict[str, dict[str, None]] = {}  # key -> distinct values (capped)
        self.many: set[str] = set()  # keys past MAX_GROUPS values
        # (earlier key, later key) -> (a->b, b->a) value maps while the two still agree
        self.pairs: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {}
        self.rows = 0
        for name in _PARAMS:
            self._register(f"param:{name}")

    def _register(self, key: str) -> None:
        seen = self.rows > 0
        self.values[key] = {_NONE: None} if seen else {}
        for other in list(self.values):
            if other == key:
                continue
            # Every earlier job lacked the new key: the two agree so far only if the other
            # had a single value across those jobs.
            olds = self.values[other]
            if not seen:
                self.pairs[(other, key)] = ({}, {})
            elif len(olds) == 1 and other not in self.many:
                (old,) = olds
                self.pairs[(other, key)] = ({old: _NONE}, {_NONE: old})
        if key.startswith("var:"):
            self.keys.append(key)

    def add(self, variables: dict[str, str], params: dict[str, Any]) -> None:
        if not self._names.issuperset(variables):
            for name in variables:
                if name not in self._names:
                    self._names.add(name)
                    self._register(f"var:{name}")
        row = {f"param:{k}": _NONE if v is None else str(v) for k, v in params.items()}
        for key in self.keys:
            value = variables.get(key[4:])
            row[key] = _NONE if value is None else str(value)
        values, many = self.values, self.many
        for key, value in row.items():
            seen = values[key]
            if value not in seen and key not in many:
                seen[value] = None
                if len(seen) > MAX_GROUPS:
                    many.add(key)
        broken = []
        for pair, (ab, ba) in self.pairs.items():
            a, b = row[pair[0]], row[pair[1]]
            if ab.setdefault(a, b) != b or ba.setdefault(b, a) != a or len(ab) > MAX_GROUPS:
                broken.append(pair)
        for pair in broken:
            del self.pairs[pair]
        self.rows += 1

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The dimensions (with their aliases) and the variables every job shares."""
        names = {key[4:] for key in self.keys}
        keys = self.keys + [f"param:{p}" for p in _PARAMS if p not in names]
        dims: list[dict[str, Any]] = []
        constants: dict[str, str] = {}
        for key in keys:
            label = key.partition(":")[2]
            many = key in self.many
            values = self.values[key]
            if not many and len(values) < 2:
                if key.startswith("var:") and values:
                    constants[label] = next(iter(values))
                continue
            owner = next((d for d in dims if (d["key"], key) in self.pairs
                          or (key, d["key"]) in self.pairs), None)
            if owner is not None and key.startswith("var:"):
                owner["aliases"].append(label)
                continue
            if owner is None:
                dims.append({"key": key, "label": label, "aliases": [], "groupable": not many})
        dims.append({"key": "status", "label": "status", "aliases": [], "groupable": True})
        return dims, constants


# ---- helpers -----------------------------------------------------------------------------


class _Videos:
    """Where each stored video path is now, relative to the run folder.

    Each folder is listed once (``os.scandir``) instead of one ``stat`` and one ``relpath``
    per job: at 100,000 jobs that was half of the report's time.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = os.path.abspath(run_dir)
        self._listed: dict[str, frozenset[str]] = {}
        self._videos = os.path.join(self.run_dir, "videos") + os.sep

    def _exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        names = self._listed.get(folder)
        if names is None:
            try:
                with os.scandir(folder or ".") as entries:
                    names = frozenset(e.name for e in entries if e.is_file())
            except OSError:
                names = frozenset()
            self._listed[folder] = names
        return name in names

    def link(self, stored: str | None) -> tuple[str | None, str | None]:
        """``(video URL relative to the run folder, None)``, or ``(None, why there is none)``."""
        if not stored:
            return None, None
        if stored.startswith(self._videos):  # the common case: where the engine puts them
            name = stored[len(self._videos):]
            if os.sep not in name and self._exists(stored):
                return "videos/" + quote(name), None
        # A relative path was recorded relative to the runner's working directory; the run
        # folder may have moved since, so the conventional place inside it is tried as well.
        name = os.path.basename(stored)
        candidates = [os.path.abspath(stored)]
        if not os.path.isabs(stored):
            candidates.append(os.path.join(self.run_dir, stored))
        candidates.append(os.path.join(self.run_dir, "videos", name))
        for candidate in candidates:
            if self._exists(candidate):
                if candidate.startswith(self.run_dir + os.sep):
                    rel = candidate[len(self.run_dir) + 1:]
                else:
                    rel = os.path.relpath(candidate, self.run_dir)
                return quote(rel.replace(os.sep, "/")), None
        return None, "video file missing"


def _placeholder(status: str, state: str, progress: float | None) -> str:
    """Why a card has no video."""
    if status == "succeeded":
        return "rendered, not downloaded"
    if status == "pending":
        if progress is not None and state == "running":
            return f"rendering · {progress:.0%}"
        return {"pending": "waiting to start", "succeeded": "rendered, downloading"}.get(
            state, f"{state}…")
    return {"failed": "no video: failed", "timed_out": "no video yet: timed out",
            "unknown": "no video: outcome unknown", "skipped": "skipped"}.get(status, "no video")


def _make_thumb(source: Path, target: Path) -> bool:
    """A small JPEG of ``source`` at ``target``; False when the image cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            image.thumbnail((THUMB_PX, THUMB_PX))
            fd, tmp = create_temp(target.parent, target.stem, ".jpg")
            with os.fdopen(fd, "wb") as fh:
                image.convert("RGB").save(fh, "JPEG", quality=80)
            os.replace(tmp, target)
        return True
    except (OSError, UnidentifiedImageError, ValueError):
        return False


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


def _commands(text: str) -> str:
    """Escaped text with `backticked` commands as <code>."""
    parts = text.split("`")
    return "".join(f"<code>{_e(p)}</code>" if i % 2 else _e(p) for i, p in enumerate(parts))


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _json_for_script(data: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>``, ``<!--`` or entity can end it early."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


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
    return "" if ts is None else _strftime(ts, "%Y-%m-%d %H:%M:%S UTC", "")


def _strftime(ts: float, fmt: str, otherwise: str) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime(fmt)
    except (ValueError, OverflowError, OSError):  # not a date (a store written before #14)
        return otherwise


__all__ = ["ContactSheet", "render_report", "write_report"]
