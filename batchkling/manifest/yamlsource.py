"""Read a manifest as plain data while remembering where every node was written.

PyYAML's ``safe_load`` throws positions away, so a pydantic error could only say
``matrices.0.axes.size.2``. Here the document is *composed* (never constructed by PyYAML) and
turned into plain Python values by a small constructor of our own that records the 1-based
line and column of every value and every mapping key, keyed by the data path.

Why not PyYAML's constructors: even the safe ones follow YAML 1.1, where ``on``/``off``/``yes`` are
booleans and ``16:9`` is the sexagesimal integer 969 — a classic trap for a field named ``size``.
Scalars here resolve by the YAML 1.2 core schema (only ``true``/``false`` are booleans; ``16:9`` and
``2024-05-01`` stay strings), and any explicit tag beyond the plain ones (``!!python/object``,
``!!binary``, custom ``!tags``) is reported as a problem, never executed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from batchkling.errors import Problem

DataPath = tuple[str | int, ...]

_STD = "tag:yaml.org,2002:"
_MAX_NODES = 2_000_000  # an alias bomb must end as a problem, not as an out-of-memory kill
_MAX_REPEATS = 100_000  # values built again through aliases; real anchors repeat a few times
#: Deeper than this, a value is dropped with a problem: no manifest nests so, and the readers
#: after this one (validation, expansion, JSON) would run out of stack on it.
MAX_DEPTH = 64


class _CoreResolver(yaml.resolver.BaseResolver):
    """Implicit typing by the YAML 1.2 core schema (plus ``<<`` merge keys)."""


for _tag, _regexp, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
    ("merge", r"^<<$", "<"),
):
    _CoreResolver.add_implicit_resolver(_STD + _tag, re.compile(_regexp), list(_first))


class _PureComposer(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _CoreResolver,
):
    """Scans, parses and composes nodes; has no constructor at all, so nothing is ever built."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _CoreResolver.__init__(self)


def _libyaml_composer() -> Callable[[str], Any] | None:
    try:
        from yaml._yaml import CParser
    except ImportError:  # PyYAML built without libyaml
        return None

    class _LibyamlComposer(CParser, _CoreResolver):
        """The same with libyaml's C scanner and parser: about ten times faster (a 300-job
        manifest composes in 4 ms instead of 47). Nodes, marks and errors are PyYAML's; libyaml
        refuses nesting deeper than 1,000 levels with a syntax error."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _CoreResolver.__init__(self)

    return _LibyamlComposer


_Composer: Callable[[str], Any] = _libyaml_composer() or _PureComposer


def format_path(path: Sequence[str | int]) -> str:
    """``("matrices", 0, "axes", "size", 2)`` → ``matrices[0].axes.size[2]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def suggest(word: str, options: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or an empty string."""
    # Case first: `PRO` is `pro` typed loudly, however little difflib thinks of the pair.
    same = [option for option in options if option.lower() == word.lower()]
    close = same or difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def show(value: Any) -> str:
    """A short description of a found value for "found X, expected Y" messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


@dataclass(slots=True)
class SourceMap:
    """Where each value (and each mapping key) of a loaded document was written."""

    file: str
    values: dict[DataPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DataPath, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: DataPath, *, key: bool = False) -> tuple[int | None, int | None]:
        """Line and column of ``path`` (its key if ``key``), else of its nearest written parent."""
        if key and path in self.keys:
            return self.keys[path]
        probe = path
        while True:
            if probe in self.values:
                return self.values[probe]
            if not probe:
                return None, None
            probe = probe[:-1]

    def problem(self, path: DataPath, message: str, *, key: bool = False) -> Problem:
        """A Problem located at ``path`` in this file."""
        line, column = self.locate(path, key=key)
        return Problem(self.file, line, column, format_path(path), message)


@dataclass(slots=True)
class LoadedYAML:
    """A document as plain data, its source map, and the problems met while reading it.

    ``fatal`` is set when the text could not be parsed at all; ``bad_paths`` holds the paths of
    values that were dropped (a forbidden tag), so validators can skip repeating that problem.
    """

    data: Any
    source: SourceMap
    problems: list[Problem]
    fatal: bool = False
    bad_paths: set[DataPath] = field(default_factory=set)
    warnings: list[Problem] = field(default_factory=list)


def decode_source(raw: bytes, file: str) -> tuple[str | None, Problem | None]:
    """Decode manifest bytes as UTF-8 (a BOM is allowed) or say exactly where they are not."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None, Problem(file, 1, 1, "", "file is UTF-16; save it as UTF-8")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.start + 1].hex()
        message = f"file is not valid UTF-8 (byte 0x{bad}); save it as UTF-8"
        return None, Problem(file, line, column, "", message)


def load_yaml(text: str, file: str) -> LoadedYAML:
    """Parse one YAML document into plain data with positions; never raises for bad input."""
    source = SourceMap(file)

    def fatal(message: str, line: int | None = None, column: int | None = None) -> LoadedYAML:
        return LoadedYAML(None, source, [Problem(file, line, column, "", message)], fatal=True)

    loader = _Composer(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or "invalid YAML"
        if exc.context:
            detail = f"{detail} ({exc.context})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        return fatal(f"YAML syntax error: {detail}", line, column)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return fatal(f"character {exc.character!r} is not allowed in YAML ({exc.reason})",
                     line, column)
    except RecursionError:
        return fatal(_TOO_DEEP)
    finally:
        loader.dispose()
    if node is None:
        return LoadedYAML(None, source, [Problem(file, 1, 1, "", "the manifest is empty")])
    builder = _Builder(source)
    try:
        data = builder.build(node, ())
    except _TooBig:
        return fatal("the document expands to too many values (an alias bomb?)")
    except _TooDeep as deep:
        return fatal(f"YAML is nested more than {MAX_DEPTH} levels deep here; a manifest never "
                     "needs that", deep.line, deep.column)
    except RecursionError:
        return fatal(_TOO_DEEP)
    return LoadedYAML(
        data, source, builder.problems, bad_paths=builder.bad_paths, warnings=builder.warnings
    )


_TOO_DEEP = "YAML is nested too deeply to read"


class _TooBig(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, line: int, column: int) -> None:
        super().__init__(line, column)
        self.line, self.column = line, column


class _Builder:
    """Turns composed nodes into dicts, lists and scalars, recording positions on the way."""

    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.bad_paths: set[DataPath] = set()
        self._count = 0
        self._active: set[int] = set()
        self._built: set[int] = set()
        self._repeats = 0
        # Each mapping's pairs with its merges applied, worked out once however often it is
        # merged or aliased: a chain of `<<: [*a, *a]` is then linear, not exponential.
        self._merged: dict[int, list[tuple[Node, Node]]] = {}
        self._merging: set[int] = set()

    def _bad(self, path: DataPath, node: Node, message: str) -> None:
        self.bad_paths.add(path)
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        self.problems.append(Problem(self.source.file, line, column, format_path(path), message))

    def _leading_zero(self, path: DataPath, node: ScalarNode) -> None:
        """``007`` is the number 7 in YAML 1.2: say so where a product code would lose zeros."""
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        message = (
            f"{node.value} is read as the number {int(node.value)} (YAML 1.2); "
            f"write '{node.value}' in quotes to keep it as text"
        )
        self.warnings.append(Problem(self.source.file, line, column, format_path(path), message))

    def build(self, node: Node, path: DataPath) -> Any:
        self._count += 1
        if id(node) in self._built:
            self._repeats += 1
        else:
            self._built.add(id(node))
        if self._count > _MAX_NODES or self._repeats > _MAX_REPEATS:
            raise _TooBig
        self.source.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if len(path) >= MAX_DEPTH:
            raise _TooDeep(node.start_mark.line + 1, node.start_mark.column + 1)
        if id(node) in self._active:
            self._bad(path, node, "a YAML alias refers to itself")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _STD + "seq":
                    self._bad(path, node, _tag_message(node.tag))
                    return None
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            assert isinstance(node, MappingNode)
            if node.tag != _STD + "map":
                self._bad(path, node, _tag_message(node.tag))
                return None
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _pairs(self, node: MappingNode, path: DataPath) -> list[tuple[Node, Node]]:
        """Key/value node pairs with ``<<`` merges applied: explicit keys win, then the earlier
        merged mapping. Computed once per node; every pair counts toward the size limit."""
        if not any(key.tag == _STD + "merge" for key, _value in node.value):
            plain: list[tuple[Node, Node]] = node.value
            return plain  # nothing to merge: nothing to remember either
        found = self._merged.get(id(node))
        if found is not None:
            return found
        if id(node) in self._merging:
            self._bad(path, node, "a YAML alias refers to itself")
            return []
        self._merging.add(id(node))
        try:
            own: list[tuple[Node, Node]] = []
            merges: list[Node] = []
            for key_node, value_node in node.value:
                if key_node.tag == _STD + "merge":
                    merges.append(value_node)
                else:
                    own.append((key_node, value_node))
            pairs = own
            if merges:
                pairs = list(own)
                seen = {_identity(key) for key, _value in own}
                for value_node in merges:
                    sources = value_node.value if isinstance(value_node, SequenceNode) \
                        else [value_node]
                    for src in sources:
                        if not (isinstance(src, MappingNode) and src.tag == _STD + "map"):
                            self._bad(path, src, "'<<' merges only mappings")
                            continue
                        for key, value in self._pairs(src, path):
                            if _identity(key) not in seen:
                                seen.add(_identity(key))
                                pairs.append((key, value))
        finally:
            self._merging.discard(id(node))
        self._count += len(pairs) - len(own)  # merged pairs; own ones are counted as built
        if self._count > _MAX_NODES:
            raise _TooBig
        self._merged[id(node)] = pairs
        return pairs

    def _mapping(self, node: MappingNode, path: DataPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        first_seen: dict[str, int] = {}
        for key_node, value_node in self._pairs(node, path):
            if not isinstance(key_node, ScalarNode):
                self._bad(path, key_node, "mapping keys must be plain strings")
                continue
            raw_key = self._scalar(key_node, path)
            if raw_key is None or isinstance(raw_key, bool):
                self._bad(path, key_node, f"invalid key {key_node.value!r}")
                continue
            key = str(raw_key)
            line = key_node.start_mark.line + 1
            if key in out:
                if first_seen[key] != line:  # a merged duplicate is an override, not a mistake
                    here = (*path, key)
                    self.problems.append(
                        Problem(
                            self.source.file,
                            line,
                            key_node.start_mark.column + 1,
                            format_path(here),
                            f"duplicate key '{key}' (first given on line {first_seen[key]})",
                        )
                    )
                continue
            first_seen[key] = line
            self.source.keys[(*path, key)] = (line, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, (*path, key))
        return out

    def _scalar(self, node: ScalarNode, path: DataPath) -> Any:
        tag, text = node.tag, node.value
        if tag == _STD + "str":
            return text
        if tag == _STD + "null":
            return None
        if tag == _STD + "bool":
            return text.lower() == "true"
        try:
            if tag == _STD + "int":
                if text[:2] in ("0o", "0x"):
                    return int(text, 0)
                if _LEADING_ZERO.match(text):
                    self._leading_zero(path, node)
                return int(text)
            if tag == _STD + "float":
                return float(
                    text.replace(".inf", "inf")
                    .replace(".Inf", "inf")
                    .replace(".INF", "inf")
                    .replace(".nan", "nan")
                    .replace(".NaN", "nan")
                    .replace(".NAN", "nan")
                )
        except ValueError:
            self._bad(path, node, f"{text!r} is not a valid {tag.removeprefix(_STD)}")
            return None
        self._bad(path, node, _tag_message(tag))
        return None


_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]")


def _identity(key: Node) -> Any:
    """What makes two mapping keys the same key: their resolved tag and text."""
    return (key.tag, key.value) if isinstance(key, ScalarNode) else id(key)


def _tag_message(tag: str) -> str:
    shown = "!!" + tag.removeprefix(_STD) if tag.startswith(_STD) else tag
    return (
        f"YAML tag '{shown}' is not allowed: a manifest holds plain data only "
        "(mappings, lists, strings, numbers, true/false)"
    )


# --- pydantic errors → located problems -------------------------------------------------------

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping (key: value lines)",
    "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
    "list_type": "a list",
}

KnownKeys = Callable[[DataPath], Sequence[str] | None]


def problems_from_validation(
    err: ValidationError,
    data: Any,
    source: SourceMap,
    *,
    prefix: DataPath = (),
    known_keys: KnownKeys | None = None,
    skip: set[DataPath] | None = None,
) -> list[Problem]:
    """Turn each pydantic error into a Problem at the file position of the offending node.

    ``data`` is what was validated (found at ``prefix`` in the document); pydantic's internal
    location parts (union members, validator names) are dropped by walking ``data`` alongside.
    Errors under a path in ``skip`` were already reported while reading the YAML.
    """
    out: list[Problem] = []
    for error in err.errors():
        path, is_key = data_path(error["loc"], data, error["type"] == "missing")
        full = (*prefix, *path)
        if skip and any(full[: len(bad)] == bad for bad in skip):
            continue
        message = _describe(error, full, known_keys)
        out.append(source.problem(full, message, key=is_key or error["type"] == "extra_forbidden"))
    return out


def _child(cur: Any, part: int | str) -> tuple[bool, Any]:
    if isinstance(cur, dict) and isinstance(part, str) and part in cur:
        return True, cur[part]
    if isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
        return True, cur[part]
    return False, None


def data_path(loc: tuple[int | str, ...], data: Any, missing: bool) -> tuple[DataPath, bool]:
    """The data path of a pydantic error location (internal parts dropped); is it a key?"""
    path: list[str | int] = []
    cur, is_key = data, False
    for i, part in enumerate(loc):
        found, child = _child(cur, part)
        if found:
            path.append(part)
            cur = child
        elif part == "[key]":
            is_key = True
        elif missing and i == len(loc) - 1:
            path.append(part)
    return tuple(path), is_key


def _describe(error: Any, path: DataPath, known_keys: KnownKeys | None) -> str:
    kind, found, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "missing":
        return f"missing required key '{path[-1]}'" if path else "missing required value"
    if kind == "extra_forbidden":
        name = str(path[-1]) if path else "?"
        options = known_keys(path[:-1]) if known_keys else None
        hint = suggest(name, options) if options else ""
        return f"unknown key '{name}'{hint}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}; found {show(found)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}; found {show(found)}"
    if kind == "too_short" and isinstance(found, list | dict):
        return f"expected at least {ctx.get('min_length', 1)} item(s); found none"
    msg = str(error["msg"])
    msg = msg[:1].lower() + msg[1:]
    return f"{msg.replace('input should be', 'expected')}; found {show(found)}"
