"""Photo intake: decode (any format the libraries read), EXIF transpose, ICC to sRGB, RGB, size checks,
content hash, resize/crop."""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from stencil_cli.base.colour import to_srgb
from stencil_cli.base.formats import heif_available, missing_decoder_hint
from stencil_cli.base.sources import PhotoSource, RejectedImage, find_photos

__all__ = [
    "PhotoSource",
    "PreparedImage",
    "RejectedImage",
    "center_crop_resize",
    "expand_paths",
    "find_photos",
    "load_rgb",
    "prepare_image",
    "to_rgb",
]

MIN_SIDE = 256  # shorter side below this is refused
RECOMMENDED_SIDE = 512  # shorter side below this gets a warning
MAX_PIXELS = 64_000_000  # decompression-bomb guard (Pillow's own default is ~89 MP)
UNREADABLE_HINT = "convert it to JPEG or PNG, or remove it"


@dataclass(frozen=True)
class PreparedImage:
    """A photo decoded, colour-managed to sRGB, normalised to 8-bit RGB and encoded for the store."""

    source: Path
    sha256: str
    width: int
    height: int
    data: bytes  # encoded normalised copy
    suffix: str  # ".png" or ".jpg"
    warnings: tuple[str, ...] = ()


def _colour_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Split any Pillow mode into 8-bit colour pixels (RGB, L or CMYK, as an ICC profile expects them) and
    an alpha channel (None when opaque)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping
        return image.point(lambda value: value * (1 / 256)).convert("L"), None
    if image.mode in ("F", "1"):
        return image.convert("L"), None
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "LA":
        return image.getchannel("L"), image.getchannel("A")
    if image.mode in ("RGBA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return rgba.convert("RGB"), rgba.getchannel("A")
    if image.mode in ("RGB", "L", "CMYK"):
        return image, None
    return image.convert("RGB"), None


def _on_white(colour: Image.Image, alpha: Image.Image | None) -> Image.Image:
    """RGB pixels with transparency (if any) composited on white."""
    if alpha is None:
        return colour
    return Image.composite(colour, Image.new("RGB", colour.size, (255, 255, 255)), alpha)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (no colour management); transparency is composited on white."""
    colour, alpha = _colour_and_alpha(image)
    return _on_white(colour.convert("RGB"), alpha)


def _pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256()
    digest.update(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def load_rgb(path: Path) -> Image.Image:
    """Open `path`, apply EXIF orientation, take the first frame, return sRGB 8-bit RGB (fully decoded)."""
    return _decode(PhotoSource(Path(path)))[0]


def _open(source: PhotoSource) -> Image.Image:
    heif_available()  # HEIC/HEIF through pi-heif, registered before the first open
    if source.read is None:
        return Image.open(source.path)
    return Image.open(io.BytesIO(source.read()))


def _decode(source: PhotoSource) -> tuple[Image.Image, str | None, list[str]]:
    """The photo as sRGB RGB, its format, and warnings (an unusable colour profile; damaged EXIF data, where
    Pillow's own warnings, which name its source files, are caught and become one line)."""
    with contextlib.ExitStack() as closing:
        with warnings.catch_warnings(record=True) as caught:  # opening reads the EXIF (dpi) already
            warnings.simplefilter("always", UserWarning)  # a DecompressionBombWarning keeps its filter
            opened = closing.enter_context(_open(source))
            source_format = opened.format
            opened.seek(0)  # animated images: first frame
            opened.load()
            try:
                image = ImageOps.exif_transpose(opened) or opened
            except (SyntaxError, ValueError, TypeError, struct.error, KeyError) as error:
                warnings.warn(f"unreadable EXIF ({error})", UserWarning, stacklevel=1)
                image = opened  # the orientation cannot be read: keep the picture as stored
        profile = opened.info.get("icc_profile")
        colour, alpha = _colour_and_alpha(image)
        colour = colour.copy() if colour is opened else colour
        colour.info["icc_profile"] = profile
        colour, warning = to_srgb(colour, source.path.name)
        image = _on_white(colour.convert("RGB"), alpha)
        image.load()
        image.info.pop("icc_profile", None)
    notes = [warning] if warning else []
    pillow = [str(item.message) for item in caught if issubclass(item.category, UserWarning)]
    if pillow:
        notes.append(f"{source.path.name}: its EXIF data is damaged ({pillow[0]}); read what could be read")
    return image, source_format, notes


def prepare_image(source: Path | PhotoSource) -> PreparedImage | RejectedImage:
    """Decode and normalise one photo, or explain why it cannot be used (and how to fix it)."""
    source = source if isinstance(source, PhotoSource) else PhotoSource(Path(source))
    path = source.path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            try:
                image, source_format, notes = _decode(source)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return RejectedImage(
            path, f"too large (over {MAX_PIXELS // 1_000_000} megapixels); scale it down and add it again"
        )
    except UnidentifiedImageError:
        hint = missing_decoder_hint(path.suffix)
        if hint:
            return RejectedImage(path, hint)
        return RejectedImage(path, f"not an image Pillow can read; {UNREADABLE_HINT}")
    except (OSError, SyntaxError, ValueError) as error:
        # truncated files and unreadable paths land here
        return RejectedImage(path, f"cannot be read ({error}); {UNREADABLE_HINT}")
    shorter = min(image.size)
    if shorter < MIN_SIDE:
        return RejectedImage(
            path,
            f"too small ({image.width}x{image.height}; the shorter side must be at least {MIN_SIDE} px); "
            "use a larger copy of the photo",
        )
    if shorter < RECOMMENDED_SIDE:
        notes.append(
            f"{path.name} is {image.width}x{image.height}; {RECOMMENDED_SIDE} px or more trains better"
        )
    buffer = io.BytesIO()
    # JPEG photos stay JPEG (high quality, small); everything else (HEIC and AVIF too: a second lossy
    # codec would add its losses to theirs) becomes lossless PNG
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
        warnings=tuple(notes),
    )


def expand_paths(
    paths: list[Path], *, recursive: bool = False
) -> tuple[list[PhotoSource], list[RejectedImage]]:
    """Expand files, folders and zips into photo sources (see `sources.find_photos`) and refusals."""
    found = find_photos(paths, recursive=recursive)
    return found.sources, found.rejected


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
