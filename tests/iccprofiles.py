"""Small ICC profiles made in the tests (Display P3, Adobe RGB), and the sRGB value a colour in them should
become, computed independently of littleCMS from the colour spaces' published primaries."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

D65 = (0.3127, 0.3290)
D50_XYZ = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


@dataclass(frozen=True)
class RGBSpace:
    """An RGB colour space: primaries and white (xy), and its transfer curve."""

    name: str
    primaries: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    white: tuple[float, float]
    gamma: float | None  # a pure power curve (Adobe RGB), or None for the sRGB curve (Display P3)

    def decode(self, values: np.ndarray) -> np.ndarray:
        """8-bit code values -> linear light."""
        v = np.asarray(values, dtype=np.float64) / 255.0
        if self.gamma is not None:
            return v**self.gamma
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)

    def to_xyz(self) -> np.ndarray:
        """The linear RGB -> XYZ matrix (white Y = 1)."""
        columns = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in self.primaries]).T
        wx, wy = self.white
        scale = np.linalg.solve(columns, np.array([wx / wy, 1.0, (1 - wx - wy) / wy]))
        return columns * scale


SRGB = RGBSpace("sRGB", ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)), D65, None)
DISPLAY_P3 = RGBSpace("Display P3", ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060)), D65, None)
ADOBE_RGB = RGBSpace("Adobe RGB (1998)", ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)), D65, 563 / 256)


def expected_srgb(rgb: tuple[int, int, int], space: RGBSpace) -> np.ndarray:
    """The 8-bit sRGB value of colour `rgb` of `space` (both D65: no adaptation), clipped to the gamut."""
    xyz = space.to_xyz() @ space.decode(np.array(rgb))
    linear = np.clip(np.linalg.solve(SRGB.to_xyz(), xyz), 0.0, 1.0)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255.0)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz_tag(xyz: np.ndarray) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(_s15(v) for v in xyz)


def _curve_tag(space: RGBSpace) -> bytes:
    if space.gamma is not None:
        return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(space.gamma * 256)) + b"\0\0"
    # parametric curve type 3: the sRGB curve
    params = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    return b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + b"".join(_s15(p) for p in params)


def _text_tag(text: str) -> bytes:
    encoded = text.encode("utf-16-be")
    return (
        b"mluc\0\0\0\0" + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(encoded), 28) + encoded
    )


def matrix_profile(space: RGBSpace) -> bytes:
    """An ICC v4 display profile of `space`: D50-adapted (Bradford) colorants and its tone curve."""
    wx, wy = space.white
    white = np.array([wx / wy, 1.0, (1 - wx - wy) / wy])
    cone_src, cone_dst = BRADFORD @ white, BRADFORD @ D50_XYZ
    adapt = np.linalg.inv(BRADFORD) @ np.diag(cone_dst / cone_src) @ BRADFORD
    colorants = adapt @ space.to_xyz()
    curve = _curve_tag(space)
    tags = [
        (b"desc", _text_tag(space.name)),
        (b"cprt", _text_tag("made in a test")),
        (b"wtpt", _xyz_tag(D50_XYZ)),
        (b"rXYZ", _xyz_tag(colorants[:, 0])),
        (b"gXYZ", _xyz_tag(colorants[:, 1])),
        (b"bXYZ", _xyz_tag(colorants[:, 2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        padded = data + b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += padded
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x04300000)
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + b"".join(_s15(v) for v in D50_XYZ)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body
