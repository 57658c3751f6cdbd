"""Which photo formats stencil reads: Pillow's own registry plus pi-heif's HEIC/HEIF opener.

The accepted suffixes are asked of the libraries (`PIL.Image.registered_extensions()`), never written out by
hand: whatever the installed Pillow (and pi-heif) can decode into pixels is a photo. `docs/store.md`
lists them (`python -m stencil_cli.base.formats` prints that list; a test checks it).
"""

from __future__ import annotations

import functools
import importlib
import sys

from PIL import Image, ImageFile

HEIF_SUFFIXES = frozenset({".heic", ".heif", ".heics", ".heifs", ".hif"})
HEIF_PACKAGE = "pi-heif"


@functools.cache
def heif_available() -> bool:
    """Register a HEIC/HEIF opener with Pillow (once); False when neither package is installed.

    pi-heif, pillow-heif's decode-only build (its wheels leave out the GPL x265 encoder), is the dependency;
    pillow-heif (the tests' HEIC writer) serves as well where only it is installed."""
    for module in ("pi_heif", "pillow_heif"):
        try:
            plugin = importlib.import_module(module)
        except ImportError:
            continue
        plugin.register_heif_opener()
        return True
    return False


def is_photo_format(name: str) -> bool:
    """Whether Pillow can decode format `name` into pixels: it opens it (PDF it only writes), it is no stub
    that needs an outside handler (BUFR, GRIB, HDF5, WMF), and Pillow registers no non-image MIME type for
    it (MPEG video it only identifies; PostScript needs Ghostscript)."""
    if name not in Image.OPEN:
        return False
    factory = Image.OPEN[name][0]
    if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
        return False
    return Image.MIME.get(name, "image/").startswith("image/")


def _openable_formats() -> dict[str, str]:
    """Suffix -> Pillow format, for every photo format (`is_photo_format`) of Pillow's registry."""
    heif_available()
    Image.init()
    registry = Image.registered_extensions()
    return {suffix.lower(): name for suffix, name in registry.items() if is_photo_format(name)}


def photo_suffixes() -> frozenset[str]:
    """Every file suffix (lower case, with the dot) whose format the installed libraries can open."""
    return frozenset(_openable_formats())


def formats_by_name() -> dict[str, list[str]]:
    """Each openable format's name (Pillow's, e.g. "JPEG", "HEIF") with its suffixes, sorted."""
    grouped: dict[str, list[str]] = {}
    for suffix, name in sorted(_openable_formats().items()):
        grouped.setdefault(name, []).append(suffix)
    return dict(sorted(grouped.items()))


def formats_markdown() -> str:
    """The accepted formats as the Markdown list `docs/store.md` carries."""
    return "".join(
        f"- {name}: {', '.join(f'`{s}`' for s in suffixes)}\n" for name, suffixes in formats_by_name().items()
    )


def missing_decoder_hint(suffix: str) -> str | None:
    """Why a file with `suffix` cannot be decoded here when only a missing package is to blame, else None."""
    if suffix.lower() in HEIF_SUFFIXES and not heif_available():
        return f"HEIC/HEIF photos need the {HEIF_PACKAGE} package: pip install {HEIF_PACKAGE}"
    return None


if __name__ == "__main__":  # pragma: no cover - the docs' list
    sys.stdout.write(formats_markdown())
