"""A loss-curve chart written as a PNG with the standard library (zlib + struct), so the demo needs
no imaging package. RGB pixels in a bytearray, lines drawn with Bresenham, labels in a 3×5 font."""

from __future__ import annotations

import math
import struct
import zlib

WHITE, GREY, BLACK = (255, 255, 255), (200, 200, 200), (40, 40, 40)
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]

# 3×5 glyphs, one string of 15 bits (rows top to bottom) per character.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "a": "000011101101011", "h": "100100111101101", "k": "100101110101101",
    "l": "110010010010111", "o": "000111101101111", "r": "000111100100100", "s": "000011110011110",
    "t": "010111010010011", "p": "000111101111100", "g": "000111101111001", "(": "001010010010001",
    ")": "100010010010100", " ": "000000000000000", ":": "000010000010000", "x": "000101010101000",
}


def write_png(path: str, width: int, height: int, pixels: bytearray) -> None:
    """Write RGB8 `pixels` (row-major, 3 bytes each) as a PNG file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\x00" + bytes(pixels[y * stride : (y + 1) * stride]) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


class _Canvas:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(WHITE * (width * height))

    def dot(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, thick: int = 1) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.dot(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color=BLACK, size: int = 2) -> None:
        for ch in text.lower():
            glyph = _FONT.get(ch, _FONT[" "])
            for i, bit in enumerate(glyph):
                if bit == "1":
                    for ox in range(size):
                        for oy in range(size):
                            self.dot(x + (i % 3) * size + ox, y + (i // 3) * size + oy, color)
            x += 4 * size


def loss_chart(path: str, series: dict[str, list[float]], width: int = 640, height: int = 400) -> None:
    """Loss per step for each named series, log-scaled y axis, legend top right."""
    write_png(path, width, height, loss_chart_pixels(series, width, height))


def loss_chart_pixels(series: dict[str, list[float]], width: int = 640, height: int = 400) -> bytearray:
    """The `loss_chart` picture as RGB8 pixels (row-major, 3 bytes each), for hosts that show images
    themselves (ComfyUI's IMAGE)."""
    canvas = _Canvas(width, height)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    values = [v for losses in series.values() for v in losses if v > 0 and math.isfinite(v)]
    if not values:
        return canvas.pixels
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    steps = max(len(losses) for losses in series.values())

    def to_xy(i: int, v: float) -> tuple[int, int]:
        x = left + round((right - left) * i / max(1, steps - 1))
        y = bottom - round((bottom - top) * (math.log10(max(v, 10.0**lo)) - lo) / (hi - lo))
        return x, y

    for decade in range(lo, hi + 1):  # grid and labels per power of ten
        _, y = to_xy(0, 10.0**decade)
        canvas.line(left, y, right, y, GREY)
        canvas.text(4, y - 5, f"1e{decade}")
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.text(left, bottom + 10, "0")
    canvas.text(right - 4 * 2 * len(str(steps)), bottom + 10, str(steps))
    canvas.text((left + right) // 2 - 16, bottom + 22, "step")
    canvas.text(4, 4, "loss (log)")
    for n, (name, losses) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        points = [to_xy(i, v) for i, v in enumerate(losses) if v > 0 and math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(x0, y0, x1, y1, color, thick=2)
        canvas.line(right - 90, top + 8 + 16 * n, right - 70, top + 8 + 16 * n, color, thick=3)
        canvas.text(right - 64, top + 4 + 16 * n, name, color)
    return canvas.pixels
