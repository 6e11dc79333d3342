"""Templates: ``{var}`` placeholders in manifest strings, their filters and brace escapes.

A string field of a matrix may name variables: ``"{product}-{size:slug}"``. ``{name}`` is the
variable's text, ``{name:slug}`` / ``{name:lower}`` / ``{name:upper}`` a filtered form, and ``{{``
and ``}}`` are literal braces. A template is compiled once into a ``str.format_map`` string, so
rendering it for each of 100,000 jobs runs in C.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: A variable name: letters, digits and '_', not starting with a digit.
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(rf"\s*({VARIABLE_NAME.pattern})\s*(?::\s*([a-z]+)\s*)?")


class TemplateError(ValueError):
    """A template string that cannot be read (unclosed brace, bad placeholder)."""


def is_template(value: str) -> bool:
    """True when ``value`` holds a ``{var}`` placeholder (``{{`` is an escaped brace)."""
    return "{" in value.replace("{{", "")


def as_text(value: Any) -> str:
    """A field value as a template variable: ``5`` → ``"5"``, ``0.5`` → ``"0.5"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


@functools.lru_cache(maxsize=4096)  # a matrix slugs the same few axis values over and over
def _slug(value: str) -> str:
    # ':' → 'x' so an aspect ratio reads naturally in a file name: 16:9 → 16x9.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value.replace(":", "x")).strip("-").lower()


_FILTERS: dict[str, Callable[[str], str]] = {"slug": _slug, "lower": str.lower, "upper": str.upper}


class _Filtered(dict[str, str]):
    """The variables plus ``"name|filter"`` keys, computed on first use (see Template.fmt)."""

    def __missing__(self, key: str) -> str:
        name, _, flt = key.partition("|")
        if not flt:
            raise KeyError(key)  # the caller reports the missing variable
        value = _FILTERS[flt](self[name])
        self[key] = value
        return value


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template.

    ``fmt`` is a ``str.format_map`` string (rendering runs in C, which matters at 100,000 jobs):
    literal braces are doubled and ``{name:slug}`` becomes the key ``{name|slug}``.
    """

    fmt: str
    filtered: bool
    constant: str | None  # the rendered text when there is no placeholder

    def render(self, variables: Mapping[str, str]) -> str:
        """Fill in the placeholders; a missing variable raises KeyError naming it."""
        if self.constant is not None:
            return self.constant
        return self.fmt.format_map(_Filtered(variables) if self.filtered else variables)


def compile_template(text: str) -> Template:
    """Parse ``{name}`` / ``{name:slug}`` placeholders; ``{{`` and ``}}`` are literal braces."""
    if "{" not in text and "}" not in text:
        return Template(text, False, text)
    out: list[str] = []
    literal: list[str] = []
    placeholders = filtered = 0
    i = 0
    while i < len(text):
        char = text[i]
        if text.startswith(("{{", "}}"), i):
            out.append(char * 2)
            literal.append(char)
            i += 2
        elif char == "{":
            end = text.find("}", i)
            match = _PLACEHOLDER.fullmatch(text, i + 1, end) if end > 0 else None
            if match is None or (match.group(2) and match.group(2) not in _FILTERS):
                shown = text[i : end + 1] if end > 0 else text[i : i + 20]
                raise TemplateError(
                    f"bad placeholder {shown!r}: write {{name}} or {{name:slug}} "
                    "(filters: slug, lower, upper), or '{{' for a literal brace"
                )
            name, flt = match.group(1), match.group(2)
            out.append(f"{{{name}|{flt}}}" if flt else f"{{{name}}}")
            placeholders += 1
            filtered += bool(flt)
            i = end + 1
        elif char == "}":
            raise TemplateError(
                f"single '}}' at character {i + 1}: write '}}}}' for a literal brace"
            )
        else:
            out.append(char)
            literal.append(char)
            i += 1
    return Template("".join(out), bool(filtered), None if placeholders else "".join(literal))
