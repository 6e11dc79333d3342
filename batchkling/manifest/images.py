"""Check local images against Kling's input rules before anything is submitted, and hash them.

Kling accepts jpg/png up to 10 MB, at least 300 px on each side, with an aspect ratio between
1:2.5 and 2.5:1 (API.md). A rejected image costs a round trip at best and a failed paid task at
worst, so every local image is opened here (headers only: Pillow reads the size without decoding
pixels) and hashed once. The sha256 goes into the job fingerprint, which is why a moved file keeps
its fingerprint and an edited one does not.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_BYTES = 10 * 1024 * 1024
MIN_SIDE = 300
MAX_ASPECT = 2.5
FORMATS = {"JPEG": "jpg", "PNG": "png"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass(frozen=True, slots=True)
class ImageCheck:
    """The outcome for one file: its sha256 and size when usable, else what is wrong with it."""

    path: Path
    sha256: str | None
    problem: str | None
    width: int = 0
    height: int = 0


def check_image(path: Path) -> ImageCheck:
    """Validate one local image (exists, jpg/png by content, size, sides, aspect) and hash it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ImageCheck(path, None, f"image file not found: {path}")
    except OSError as exc:
        return ImageCheck(path, None, f"cannot read image {path}: {exc.strerror or exc}")
    if not path.is_file():
        return ImageCheck(path, None, f"image path is not a file: {path}")
    if stat.st_size > MAX_BYTES:
        mb = stat.st_size / 1024 / 1024
        return ImageCheck(path, None, f"image is {mb:.1f} MB; Kling accepts at most 10 MB: {path}")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is just a big header here; the size rules decide.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                fmt, (width, height) = img.format, img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError):
        # Pillow's plugins signal corrupt headers with SyntaxError/ValueError as well.
        return ImageCheck(path, None, f"not a jpg or png image (by content): {path}")
    except OSError as exc:
        return ImageCheck(path, None, f"cannot read image {path}: {exc.strerror or exc}")
    if fmt not in FORMATS:
        return ImageCheck(path, None, f"image is {fmt}; Kling accepts jpg or png: {path}")
    if min(width, height) < MIN_SIDE:
        return ImageCheck(
            path,
            None,
            f"image is {width}x{height} px; Kling needs {MIN_SIDE} px or more on each side: {path}",
        )
    ratio = width / height
    if not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        return ImageCheck(
            path,
            None,
            f"image aspect ratio {width}x{height} ({ratio:.2f}:1) is outside 1:2.5..2.5:1: {path}",
        )
    return ImageCheck(path, _sha256(path), None, width, height)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ImageCache:
    """Checks each distinct path once: a 100,000-job matrix over 20 images opens 20 files."""

    def __init__(self) -> None:
        self._by_path: dict[Path, ImageCheck] = {}
        self.checked = 0  # how many files were actually opened (tests and the benchmark read it)

    def check(self, path: Path) -> ImageCheck:
        """The cached result for ``path`` (absolute), checking the file on first use."""
        found = self._by_path.get(path)
        if found is None:
            found = check_image(path)
            self._by_path[path] = found
            self.checked += 1
        return found


def resolve_image(
    raw: str, base_dir: Path, cache: ImageCache
) -> tuple[str | None, str | None, str | None]:
    """A manifest's image as ``(location, sha256, None)``, or ``(None, None, problem)``.

    An http(s) URL is sent as is and never fetched here; anything else is a path relative to
    ``base_dir`` (or absolute), checked and hashed through ``cache``.
    """
    scheme = _SCHEME_RE.match(raw)
    if scheme:
        if scheme.group(1).lower() in ("http", "https") and re.match(r"(?i)^https?://[^/\s]+", raw):
            return raw, None, None
        return (
            None,
            None,
            f"unsupported image location {raw!r}: use a path relative to the manifest or an "
            "http(s) URL",
        )
    path = Path(raw)
    absolute = Path(os.path.abspath(path if path.is_absolute() else base_dir / path))
    check = cache.check(absolute)
    return (
        (str(absolute), check.sha256, None)
        if check.problem is None
        else (None, None, check.problem)
    )
