"""tools/benchmark.py and the dependency-free PNG plot."""
import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from metaformer_zoo.plot import nice_ticks, read_png_header, scatter_png, write_png

ROOT = Path(__file__).resolve().parents[1]


def _png_chunks(data):
    """Independent minimal PNG parser: (kind, body) for every chunk, CRCs checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + n
    return out


def test_write_png_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(str(tmp_path / "a.png"), img, text={"Title": "t"})
    chunks = _png_chunks((tmp_path / "a.png").read_bytes())
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (w, h, depth, ctype) == (5, 7, 8, 2)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(7, 1 + 15)
    assert np.array_equal(rows[:, 1:].reshape(7, 5, 3), img)
    with pytest.raises(ValueError, match="H, W, 3"):
        write_png(str(tmp_path / "b.png"), np.zeros((4, 4), np.uint8))


def test_nice_ticks():
    assert nice_ticks(0.0, 10.0, 6) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    ticks = nice_ticks(74.3, 85.9)
    assert ticks[0] >= 74.3 and ticks[-1] <= 85.9 and len(ticks) >= 3


def test_scatter_png_size_and_content(tmp_path):
    path = tmp_path / "s.png"
    scatter_png(str(path), [100, 1000, 5000], [74.6, 80.0, 83.6], [12, 56, 26], labels=["a", "b", "c"],
                groups=["x", "x", "y"], width=400, height=300, log_x=True, title="t", xlabel="img/s", ylabel="top-1")
    info = read_png_header(str(path))
    assert (info["width"], info["height"], info["bit_depth"], info["color_type"]) == (400, 300, 8, 2)
    px = info["pixels"]
    # both group colours are drawn (blended fill of the first two palette colours)
    assert (np.abs(px.astype(int) - [255, 255, 255]).sum(-1) > 0).mean() > 0.02
    assert len({tuple(c) for c in px.reshape(-1, 3)}) > 4


def test_benchmark_tool_table_and_plot(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("zoo_benchmark_cli", ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plot = tmp_path / "p.png"
    rows = bench.main(["--models", "identityformer_s12", "--model-kwargs", "depths=(1,1,1,1)", "dims=(8,16,24,32)",
                       "--device", "cpu", "--img-size", "32", "-b", "1", "--num-warmup", "0", "--num-iters", "1",
                       "--plot", str(plot), "--plot-size", "320x240", "--csv", str(tmp_path / "r.csv"),
                       "--no-progress"])
    (row,) = rows
    assert row["infer_img_s"] > 0 and row["train_ms"] > 0 and row["peak_mem_mb"] >= 0
    assert row["top1"] == 74.6  # model_cards/results.csv
    assert 0 < row["params_m"] < 1 and row["gmacs"] > 0
    out = capsys.readouterr().out
    assert "identityformer_s12" in out and "infer_img_s" in out
    info = read_png_header(str(plot))
    assert (info["width"], info["height"]) == (320, 240)
    assert (tmp_path / "r.csv").read_text().startswith("model,family,params_m")
