"""Dependency-free bubble-scatter PNGs (numpy + zlib), used by ``tools/benchmark.py --plot`` without matplotlib.

``scatter_png(path, xs, ys, sizes, labels=..., groups=...)`` draws axes with "nice" ticks and numeric tick labels,
filled alpha-blended circles (area proportional to ``sizes``), optional point labels and axis titles in a built-in
3x5 pixel font, and writes an 8-bit RGB PNG (``write_png``). ``read_png_header`` parses and checks a PNG's chunks.
"""
import math
import struct
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["write_png", "read_png_header", "scatter_png", "nice_ticks"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str, rgb: np.ndarray, text: Optional[Dict[str, str]] = None) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit truecolour PNG; ``text`` adds tEXt chunks (Latin-1)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()  # filter 0 rows
    out = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1")[:79] + b"\x00" + str(value).encode("latin-1", "replace")))
    out += [_chunk(b"IDAT", zlib.compress(raw, 9)), _chunk(b"IEND", b"")]
    with open(path, "wb") as f:
        f.write(b"".join(out))


def read_png_header(path: str) -> Dict:
    """Parse a PNG: check signature and every chunk CRC; return width, height, bit depth, colour type, chunk names,
    and (for 8-bit RGB without interlace) the decoded pixel array."""
    data = open(path, "rb").read()
    if data[:8] != PNG_SIGNATURE:
        raise ValueError(f"{path}: not a PNG (bad signature)")
    pos, chunks, idat = 8, [], b""
    info = {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: CRC mismatch in chunk {kind!r}")
        chunks.append(kind.decode("latin-1"))
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            info.update(width=w, height=h, bit_depth=depth, color_type=ctype, interlace=interlace)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    info["chunks"] = chunks
    if chunks[0] != "IHDR" or chunks[-1] != "IEND" or "IDAT" not in chunks:
        raise ValueError(f"{path}: chunks out of order: {chunks}")
    if info["bit_depth"] == 8 and info["color_type"] == 2 and info["interlace"] == 0:
        raw = np.frombuffer(zlib.decompress(idat), np.uint8)
        w, h = info["width"], info["height"]
        if raw.size != h * (1 + 3 * w):
            raise ValueError(f"{path}: IDAT holds {raw.size} bytes, expected {h * (1 + 3 * w)}")
        rows = raw.reshape(h, 1 + 3 * w)
        if np.all(rows[:, 0] == 0):  # only filter type 0 is decoded here (what write_png writes)
            info["pixels"] = rows[:, 1:].reshape(h, w, 3)
    return info


# --- 3x5 pixel font (rows top to bottom, 3 bits each, MSB = left column) -----------------------------------------------
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5), "O": (2, 5, 5, 5, 2),
    "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2),
    "Z": (7, 1, 2, 4, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "_": (0, 0, 0, 0, 7), " ": (0, 0, 0, 0, 0),
    "/": (1, 1, 2, 4, 4), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4), "%": (5, 1, 2, 4, 5), ":": (0, 2, 0, 2, 0),
    "=": (0, 7, 0, 7, 0), "+": (0, 2, 7, 2, 0), ",": (0, 0, 0, 2, 4),
}


def _text_size(text: str, scale: int) -> Tuple[int, int]:
    return (4 * len(text) - 1) * scale if text else 0, 5 * scale


def _draw_text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> None:
    h, w, _ = img.shape
    for i, ch in enumerate(text.upper()):
        rows = _FONT.get(ch, _FONT["-"])
        for r, bits in enumerate(rows):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    x0, y0 = x + (4 * i + c) * scale, y + r * scale
                    if 0 <= x0 and x0 + scale <= w and 0 <= y0 and y0 + scale <= h:
                        img[y0:y0 + scale, x0:x0 + scale] = color


def nice_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    """About ``n`` round tick values (steps 1/2/5 x 10^k) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError("tick range must be finite")
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 5, 10) if s * mag >= 0.7 * raw), default=10 * mag)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if abs(v) >= 1000 and v == int(v):
        return f"{int(v)}"
    return f"{v:g}"


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def scatter_png(path: str, xs: Sequence[float], ys: Sequence[float], sizes: Sequence[float],
                labels: Optional[Sequence[str]] = None, groups: Optional[Sequence[str]] = None,
                width: int = 900, height: int = 600, title: str = "", xlabel: str = "", ylabel: str = "",
                log_x: bool = False, max_radius: int = 28, min_radius: int = 3) -> None:
    """Bubble scatter: circle area proportional to ``sizes``; one colour per group; writes a PNG of width x height."""
    xs, ys, sizes = (np.asarray(a, dtype=float) for a in (xs, ys, sizes))
    if not (len(xs) == len(ys) == len(sizes)) or len(xs) == 0:
        raise ValueError("xs, ys and sizes must be non-empty and of equal length")
    if log_x and np.any(xs <= 0):
        raise ValueError("log_x needs positive x values")
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 80, 30, 40, 60
    pw, ph = width - left - right, height - top - bottom
    if pw < 50 or ph < 50:
        raise ValueError(f"plot size {width}x{height} is too small")
    fx = np.log10(xs) if log_x else xs

    def _range(v):
        lo, hi = float(v.min()), float(v.max())
        pad = (hi - lo) * 0.08 or max(abs(lo) * 0.1, 1.0)
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = _range(fx), _range(ys)
    xt = nice_ticks(x0, x1) if not log_x else [t for t in range(math.floor(x0), math.ceil(x1) + 1)]
    yt = nice_ticks(y0, y1)
    x0, x1 = min(x0, xt[0]), max(x1, xt[-1])
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])

    def px(v):
        return left + (v - x0) / (x1 - x0) * pw

    def py(v):
        return top + ph - (v - y0) / (y1 - y0) * ph

    grid, black = (225, 225, 225), (0, 0, 0)
    for t in xt:
        c = int(round(px(t)))
        img[top:top + ph, c] = grid
        img[top + ph:top + ph + 6, c] = black
        label = _fmt(10 ** t) if log_x else _fmt(t)
        tw, _ = _text_size(label, 2)
        _draw_text(img, c - tw // 2, top + ph + 10, label)
    for t in yt:
        r = int(round(py(t)))
        img[r, left:left + pw] = grid
        img[r, left - 6:left] = black
        label = _fmt(t)
        tw, th = _text_size(label, 2)
        _draw_text(img, left - 10 - tw, r - th // 2, label)
    img[top:top + ph + 1, left] = black
    img[top:top + ph + 1, left + pw] = black
    img[top, left:left + pw + 1] = black
    img[top + ph, left:left + pw + 1] = black

    # bubbles, largest first so small ones stay visible
    smax = float(sizes.max()) if sizes.max() > 0 else 1.0
    radii = np.clip(max_radius * np.sqrt(np.maximum(sizes, 0) / smax), min_radius, max_radius)
    group_names = list(dict.fromkeys(groups)) if groups is not None else []
    yy, xx = np.mgrid[0:height, 0:width]
    for i in np.argsort(-radii):
        cx, cy, rad = px(fx[i]), py(ys[i]), radii[i]
        color = np.array(_PALETTE[group_names.index(groups[i]) % len(_PALETTE)] if groups is not None
                         else _PALETTE[0], float)
        ys0, ys1 = max(int(cy - rad - 2), 0), min(int(cy + rad + 3), height)
        xs0, xs1 = max(int(cx - rad - 2), 0), min(int(cx + rad + 3), width)
        d = np.sqrt((xx[ys0:ys1, xs0:xs1] - cx) ** 2 + (yy[ys0:ys1, xs0:xs1] - cy) ** 2)
        patch = img[ys0:ys1, xs0:xs1].astype(float)
        fill = d <= rad
        patch[fill] = 0.45 * patch[fill] + 0.55 * color
        ring = (d > rad - 1.2) & (d <= rad + 0.2)
        patch[ring] = color * 0.6
        img[ys0:ys1, xs0:xs1] = patch.astype(np.uint8)
    if labels is not None:
        for i, text in enumerate(labels):
            if text:
                tw, _ = _text_size(str(text), 2)
                lx = int(px(fx[i]) + radii[i] + 3)
                if lx + tw > width - 2:  # keep labels inside the image: put them left of the bubble
                    lx = int(px(fx[i]) - radii[i] - 3 - tw)
                _draw_text(img, lx, int(py(ys[i])) - 5, str(text), (40, 40, 40), 2)
    if title:
        tw, _ = _text_size(title, 2)
        _draw_text(img, left + (pw - tw) // 2, 12, title)
    if xlabel:
        tw, _ = _text_size(xlabel, 2)
        _draw_text(img, left + (pw - tw) // 2, height - 22, xlabel)
    if ylabel:
        _draw_text(img, 8, max(top - 14, 0), ylabel)
    # legend (groups)
    lx, ly = left + 10, top + 10
    for g in group_names:
        color = _PALETTE[group_names.index(g) % len(_PALETTE)]
        img[ly:ly + 10, lx:lx + 10] = color
        _draw_text(img, lx + 14, ly, g, (40, 40, 40), 2)
        ly += 16
    write_png(path, img, text={"Title": title or "scatter", "Software": "metaformer_zoo.plot",
                               "Description": f"x: {xlabel}; y: {ylabel}; bubble area: size"})
