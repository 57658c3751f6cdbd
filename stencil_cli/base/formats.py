"""Which photo formats stencil reads: Pillow's own registry plus pillow-heif's HEIC/HEIF opener.

The accepted suffixes are asked of the libraries (`PIL.Image.registered_extensions()`), never written out by
hand: whatever the installed Pillow (and pillow-heif) can open is a photo. `docs/store.md` lists them
(`python -m stencil_cli.base.formats` prints that list; a test checks it).
"""

from __future__ import annotations

import functools
import sys

from PIL import Image

HEIF_SUFFIXES = frozenset({".heic", ".heif", ".heics", ".heifs", ".hif"})
HEIF_PACKAGE = "pillow-heif"


@functools.cache
def heif_available() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once); False when pillow-heif is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _openable_formats() -> dict[str, str]:
    """Suffix -> Pillow format, for the formats Pillow can open (not those it can only write, like PDF)."""
    heif_available()
    Image.init()
    return {
        suffix.lower(): name for suffix, name in Image.registered_extensions().items() if name in Image.OPEN
    }


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
