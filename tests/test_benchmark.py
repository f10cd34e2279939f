"""tools/benchmark.py: table, CSV, library timers, timm's kwargs parser and the matplotlib top-1 figure."""
import sys
import time
import types

import matplotlib.image
import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401
from helpers import load_script
from metaformer_zoo import hub, zoo

TINY = ["--model-kwargs", "depths=(1,1,1,1)", "dims=(8,16,24,32)"]
FAST = ["--device", "cpu", "--img-size", "32", "-b", "1", "--num-warmup", "0", "--min-run-time", "0.01",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def bench():
    return load_script("tools/benchmark.py", "zoo_benchmark_cli")


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # FAST sets --threads 1 (tiny models; a shared CPU host)
    yield
    torch.set_num_threads(threads)


def test_benchmark_tool_table_and_plot(bench, tmp_path, capsys):
    plot = tmp_path / "p.png"
    rows = bench.main(["--models", "identityformer_s12", "zoo_metaformer", *TINY, *FAST, "--plot", str(plot),
                       "--plot-size", "640x400", "--csv", str(tmp_path / "r.csv")])
    row, composed = rows
    assert row["infer_img_s"] > 0 and row["train_ms"] > 0 and row["peak_mem_mb"] >= 0
    assert row["infer_img_s"] == pytest.approx(1e3 / row["infer_ms"])
    assert (row["top1"], row["top1_source"]) == hub.official_results()["identityformer_s12"]
    assert 0 < row["params_m"] < 1 and row["gmacs"] > 0  # the kwargs reached create_model (tiny model)
    assert composed["top1"] is None and composed["infer_ms"] > 0
    out = capsys.readouterr().out
    assert "identityformer_s12" in out and "infer_img_s" in out
    # the composed family has no published top-1: named, not silently dropped
    assert "no published top-1 (not drawn): composed (zoo_metaformer)" in out
    assert "plot: " in out and "(1 models of 1 families, x = infer_img_s)" in out
    assert matplotlib.image.imread(plot).shape[:2] == (400, 640)
    assert (tmp_path / "r.csv").read_text().startswith("model,family,params_m")


def test_model_kwargs_use_timm_parser(bench, capsys):
    action = next(a for a in bench.build_parser()._actions if a.dest == "model_kwargs")
    assert isinstance(action, timm.utils.ParseKwargs)
    args = bench.build_parser().parse_args(["--models", "m", "--model-kwargs", "dims=(8,16)", "act=gelu", "x=1.5"])
    assert args.model_kwargs == {"dims": (8, 16), "act": "gelu", "x": 1.5}
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--models", "m", "--model-kwargs", "dims"])
    assert "is not key=value" in capsys.readouterr().err


def test_measure_ms_cpu_uses_torch_benchmark(bench, monkeypatch):
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02)

    blocked = []
    real = torch.utils.benchmark.Timer.blocked_autorange
    monkeypatch.setattr(torch.utils.benchmark.Timer, "blocked_autorange",
                        lambda self, **kw: blocked.append(kw) or real(self, **kw))
    ms = bench.measure_ms(fn, torch.device("cpu"), warmup=2, min_run_time=0.05)
    assert blocked == [dict(min_run_time=0.05)]
    assert 19.0 <= ms < 200.0  # a 20 ms sleep, median per call
    assert len(calls) >= 2 + 2  # the warm-up calls, the block-size estimate and at least one timed block


def test_measure_ms_cuda_uses_do_bench(bench, monkeypatch):
    seen = {}

    def do_bench(fn, rep, return_mode):
        fn()
        seen.update(rep=rep, return_mode=return_mode)
        return 1.25

    testing = types.SimpleNamespace(do_bench=do_bench)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(testing=testing))
    monkeypatch.setitem(sys.modules, "triton.testing", testing)
    monkeypatch.setattr(metaformer_zoo.kernels, "triton_available", lambda: True)
    calls = []
    assert bench.measure_ms(lambda: calls.append(1), torch.device("cuda"), warmup=3, min_run_time=0.2) == 1.25
    assert seen == dict(rep=200.0, return_mode="median") and len(calls) == 4


def test_plot_every_family_with_a_published_top1(bench, tmp_path):
    """One row per catalogued family: every family with a published top-1 is drawn, the others are listed."""
    results = hub.official_results()
    rows = []
    for i, fam in enumerate(zoo.list_families()):
        name = fam.variants[0]
        top1 = results.get(name)
        rows.append(dict(model=name, family=fam.name, params_m=5.0 + i, gmacs=1.0 + i, batch=8,
                         infer_img_s=100.0 * (i + 1), top1=top1[0] if top1 else None,
                         top1_source=top1[1] if top1 else None))
    published = [f.name for f in zoo.list_families() if f.variants[0] in results]
    assert {"affnet", "raftmlp", "msmlp", "stripmlp", "vim2"} <= set(published)
    summary = bench.plot_results(rows, str(tmp_path / "f.png"), size=(900, 600))
    assert summary["x"] == "infer_img_s" and summary["families"] == published
    assert summary["points"] == len(published) and summary["not_measured"] == []
    assert summary["paper_only"] == [r["model"] for r in rows if r["family"] in ("raftmlp", "vim2")]  # hollow
    assert summary["without_top1"] == [f"{f.name} ({f.variants[0]})" for f in zoo.list_families()
                                       if f.variants[0] not in results]
    assert "composed (zoo_metaformer)" in summary["without_top1"]
    assert matplotlib.image.imread(tmp_path / "f.png").shape[:2] == (600, 900)


def test_plot_macs_without_timing(bench, tmp_path, capsys):
    """--no-infer --no-train: models are only built on the meta device and the figure is top-1 vs MACs."""
    plot = tmp_path / "m.png"
    rows = bench.main(["--models", "affnet_et", "raftmlp_s", "--no-infer", "--no-train", "--no-progress",
                       "--plot", str(plot), "--csv", str(tmp_path / "m.csv")])
    assert [r["infer_ms"] for r in rows] == [None, None] and all(r["gmacs"] > 0 for r in rows)
    assert rows[1]["top1_source"].startswith("paper arXiv")  # drawn hollow: paper-only number
    out = capsys.readouterr().out
    assert "(2 models of 2 families, x = gmacs)" in out and "no published top-1" not in out
    assert plot.is_file()
    with pytest.raises(SystemExit, match="gmacs|throughput"):
        bench.plot_results([dict(rows[0], top1=None)], str(tmp_path / "none.png"))


def test_plot_without_matplotlib_says_how_to_install(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "Figure", None)
    with pytest.raises(SystemExit, match=r"pip install 'metaformer-zoo\[plot\]'"):
        bench.main(["--models", "identityformer_s12", "--plot", str(tmp_path / "p.png"), *FAST])
    assert not (tmp_path / "p.png").exists()
    bench.main(["--models", "identityformer_s12", *TINY, *FAST, "--no-train"])  # the table needs no matplotlib



@pytest.mark.parametrize("tool,argv", [("train", []), ("validate", ["--checkpoint", "x"]),
                                       ("convert", ["--model", "m", "--checkpoint", "c", "--out", "o"]),
                                       ("benchmark", ["--models", "m"]), ("benchmark_mixers", ["m"])])
def test_every_tool_parses_model_kwargs_one_way(tool, argv, capsys):
    """--model-kwargs is metaformer_zoo.cli.model_kwarg items into timm's ParseKwargs in every tool."""
    from metaformer_zoo.cli import model_kwarg
    mod = load_script(f"tools/{tool}.py", f"tool_{tool}")
    parser = mod.build_parser()
    action = next(a for a in parser._actions if a.dest == "model_kwargs")
    assert isinstance(action, timm.utils.ParseKwargs) and action.type is model_kwarg
    args = parser.parse_args(argv + ["--model-kwargs", "dims=(8, 16)", "act=gelu", "drop_path_rate=0.1"])
    assert args.model_kwargs == {"dims": (8, 16), "act": "gelu", "drop_path_rate": 0.1}
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--model-kwargs", "=3"])
    assert "'=3' is not key=value" in capsys.readouterr().err


def test_time_pair_alternates_and_measures_both(bench, monkeypatch):
    def fast():
        time.sleep(0.005)

    def slow():
        time.sleep(0.015)

    a, b = bench.time_pair(fast, slow, torch.device("cpu"), warmup=1, min_run_time=0.12, rounds=4)
    assert 4.5 <= a < 60 and 14 <= b < 100 and b / a > 1.5
    timed = []  # which function each measure_ms call timed: the one timed first alternates round by round
    monkeypatch.setattr(bench, "measure_ms", lambda fn, *a, **k: timed.append(fn) or (1.0 if fn is fast else 3.0))
    assert bench.time_pair(fast, slow, "cpu", warmup=0, rounds=4) == (1.0, 3.0)
    assert timed == [fast, slow, slow, fast, fast, slow, slow, fast]


def test_compare_and_official_side_by_side(bench, tmp_path, capsys):
    rows = bench.main(["--models", "identityformer_s12", *TINY, *FAST, "--compare", "poolformerv2_s12", "--rounds", "2"])
    row = rows[0]
    assert row["ref"] == "poolformerv2_s12" and row["ref_infer_ms"] > 0 and row["ref_train_ms"] > 0
    assert row["infer_speedup"] == pytest.approx(row["ref_infer_ms"] / row["infer_ms"])
    out = capsys.readouterr().out
    assert "infer_speedup" in out and "poolformerv2_s12 time / model time" in out
    # --official: the user's builder gets (name, zoo model); here it returns a copy with the same weights
    factory = tmp_path / "official_glue.py"
    factory.write_text("import copy\nSEEN = []\n"
                       "def build(name, model):\n    SEEN.append(name)\n    return copy.deepcopy(model)\n")
    rows = bench.main(["--models", "identityformer_s12", *TINY, *FAST, "--official", f"{factory}:build",
                       "--rounds", "2", "--no-train"])
    row = rows[0]
    assert row["ref"] == "official" and row["train_speedup"] is None
    assert 0.2 < row["infer_speedup"] < 5  # the same network both sides
    assert "official time / model time" in capsys.readouterr().out
    for spec, msg in ((f"{tmp_path}/missing.py:build", "no such file"), ("nocolon", "FILE.py:FUNC"),
                      (f"{factory}:nothing", "has no function 'nothing'"),
                      ("no_such_module_xyz:f", "cannot import")):
        with pytest.raises(SystemExit, match=msg):
            bench.main(["--models", "identityformer_s12", *TINY, *FAST, "--official", spec])
    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--models", "identityformer_s12", *FAST, "--compare", "no_such_model"])
