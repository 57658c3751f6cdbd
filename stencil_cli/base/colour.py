"""Colour management on intake: a photo's embedded ICC profile is converted to sRGB with Pillow's ImageCms.

The models were trained on sRGB pixels, so a Display P3 (recent phones) or Adobe RGB photo whose numbers were
read as sRGB would train the subject with shifted colours. A profile that cannot be used (damaged, or made
for another colour space than the pixels) is not fatal: the photo is read as sRGB, with a warning.
"""

from __future__ import annotations

import io

from PIL import Image, ImageCms

# the ICC colour space signature each Pillow mode's pixels are in
_MODE_SPACES = {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}
INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC  # matrix profiles (P3, Adobe RGB) have no perceptual tables


def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def embedded_profile(image: Image.Image) -> bytes | None:
    """The ICC profile embedded in `image`, if any."""
    data = image.info.get("icc_profile")
    return data or None


def to_srgb(image: Image.Image, name: str) -> tuple[Image.Image, str | None]:
    """`image` (mode RGB, L or CMYK) converted from its embedded ICC profile to sRGB RGB, and a warning when
    the profile could not be used (the pixels are then taken as sRGB). Without a profile: as it is."""
    data = embedded_profile(image)
    if data is None:
        return image, None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(data))
        space = profile.profile.xcolor_space.strip()
        if space != _MODE_SPACES.get(image.mode):
            raise ValueError(f"a {space} profile on {image.mode} pixels")
        converted = ImageCms.profileToProfile(
            image, profile, _srgb(), renderingIntent=INTENT, outputMode="RGB"
        )
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as error:
        reason = str(error).strip() or type(error).__name__
        return without_profile(
            image
        ), f"{name} has a colour profile that cannot be used ({reason}); read as sRGB"
    assert converted is not None  # profileToProfile returns a new image unless inPlace
    return without_profile(converted), None


def without_profile(image: Image.Image) -> Image.Image:
    """`image` with no ICC profile attached (its pixels are sRGB now; PNG would copy the old one over)."""
    image.info.pop("icc_profile", None)
    return image
