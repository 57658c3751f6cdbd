"""Photo intake: decode, EXIF transpose, RGB, size checks, content hash, resize/crop."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 256  # shorter side below this is refused
RECOMMENDED_SIDE = 512  # shorter side below this gets a warning
MAX_PIXELS = 64_000_000  # decompression-bomb guard (Pillow's own default is ~89 MP)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic"}


@dataclass(frozen=True)
class PreparedImage:
    """A photo decoded, normalised to 8-bit RGB and encoded for the store."""

    source: Path
    sha256: str
    width: int
    height: int
    data: bytes  # encoded normalised copy
    suffix: str  # ".png" or ".jpg"
    warning: str | None = None


@dataclass(frozen=True)
class RejectedImage:
    """A file that could not be taken, and why."""

    source: Path
    reason: str


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping
        image = image.point(lambda value: value * (1 / 256)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256()
    digest.update(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def load_rgb(path: Path) -> Image.Image:
    """Open `path`, apply EXIF orientation, take the first frame, return 8-bit RGB (fully decoded)."""
    return _decode(path)[0]


def _decode(path: Path) -> tuple[Image.Image, str | None, str | None]:
    """The picture as RGB, its format, and a note when its EXIF data is damaged (Pillow's warnings about it,
    which name its own source files, are caught here and become that one note)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # a DecompressionBombWarning keeps the caller's filter
        with Image.open(path) as opened:
            source_format = opened.format
            opened.seek(0)  # animated images: first frame
            opened.load()
            try:
                image = ImageOps.exif_transpose(opened) or opened
            except (SyntaxError, ValueError, TypeError, struct.error, KeyError) as error:
                warnings.warn(f"unreadable EXIF ({error})", UserWarning, stacklevel=1)
                image = opened  # the orientation cannot be read: keep the picture as stored
            image = to_rgb(image)
            image.load()
            image = image.copy()
    notes = [str(item.message) for item in caught if issubclass(item.category, UserWarning)]
    note = f"{path.name}: its EXIF data is damaged ({notes[0]}); read what could be read" if notes else None
    return image, source_format, note


def prepare_image(path: Path) -> PreparedImage | RejectedImage:
    """Decode and normalise one photo, or explain why it cannot be used."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            try:
                image, source_format, exif_note = _decode(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return RejectedImage(path, f"too large (over {MAX_PIXELS // 1_000_000} megapixels)")
    except UnidentifiedImageError:
        return RejectedImage(path, "not an image Pillow can read")
    except (OSError, SyntaxError, ValueError) as error:
        # truncated files and unreadable paths land here
        return RejectedImage(path, f"cannot be read ({error})")
    shorter = min(image.size)
    if shorter < MIN_SIDE:
        return RejectedImage(
            path, f"too small ({image.width}x{image.height}; the shorter side must be at least {MIN_SIDE} px)"
        )
    warning = exif_note
    if shorter < RECOMMENDED_SIDE:
        small = f"{path.name} is {image.width}x{image.height}; {RECOMMENDED_SIDE} px or more trains better"
        warning = f"{warning}; {small}" if warning else small
    buffer = io.BytesIO()
    # photos stay JPEG (high quality, small); everything else becomes lossless PNG
    suffix = ".jpg" if source_format == "JPEG" else ".png"
    if suffix == ".jpg":
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buffer, format="PNG")
    return PreparedImage(
        source=path,
        sha256=_pixel_hash(image),
        width=image.width,
        height=image.height,
        data=buffer.getvalue(),
        suffix=suffix,
        warning=warning,
    )


def expand_paths(paths: list[Path]) -> tuple[list[Path], list[RejectedImage]]:
    """Expand folders into their image files (sorted); report paths that do not exist."""
    files: list[Path] = []
    missing: list[RejectedImage] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files.extend(
                sorted(
                    child
                    for child in path.iterdir()
                    if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append(RejectedImage(path, "no such file or folder"))
    return files, missing


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` and centre-crop to `size` x `size` (METHOD.md, section 2)."""
    scale = size / min(image.size)
    resized = image.resize(
        (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
        Image.Resampling.BICUBIC,
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))
