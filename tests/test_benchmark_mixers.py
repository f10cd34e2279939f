"""Smoke test of tools/benchmark_mixers.py (both modes, 10 ms timing budget, tiny shapes)."""
import importlib.util
import os

import pytest
import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_mixers", os.path.join(ROOT, "tools", "benchmark_mixers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAST = ["--batch", "2", "--min-run-time", "0.01", "--warmup", "0", "--device", "cpu", "--no-progress"]


def test_model_mode_finds_every_mixer(bench, capsys, tmp_path):
    kwargs = ["depths=[1, 2, 1, 1]", "dims=[20, 40, 80, 160]",
              "token_mixers=['mixshift', 'identity', 'mixshift', 'attention']"]  # timm ParseKwargs items
    csv_path = tmp_path / "mixers.csv"
    rows = bench.main(["zoo_metaformer", "--model-kwargs", *kwargs, "--img-size", "64", "--backward",
                       "--csv", str(csv_path)] + FAST)
    out = capsys.readouterr().out
    # one distinct mixer per stage (the two identical stage-1 mixers are timed once and counted twice)
    assert [(r["stage"], r["mixer"], r["count"]) for r in rows] == [
        ("0", "MixShift", 1), ("1", "IdentityMixer", 2), ("2", "MixShift", 1), ("3", "Attention2d", 1)]
    assert [r["input"] for r in rows] == ["1x20x16x16", "1x40x8x8", "1x80x4x4", "1x160x2x2"]
    assert all(isinstance(r["fwd_ms"], float) and r["fwd_ms"] >= 0 for r in rows)
    assert all(isinstance(r["fwd_bwd_ms"], float) for r in rows)
    assert "fwd_bwd_ms" in out and "MixShift" in out
    assert csv_path.read_text().splitlines()[0].startswith("model,stage,mixer,count,input,fwd_ms")


def test_registry_mode_and_errors(bench, capsys):
    rows = bench.main(["--mixers", "mixshift", "no_such_mixer", "--shapes", "20x56x56", "10x7x7"] + FAST)
    by = {(r["mixer"].split(" ")[0], r["input"]): r for r in rows}
    assert by[("mixshift", "20x56x56")]["stage"] == "0" and by[("mixshift", "10x7x7")]["stage"] == "3"
    assert isinstance(by[("mixshift", "10x7x7")]["fwd_ms"], float)
    assert str(by[("no_such_mixer", "10x7x7")]["fwd_ms"]).startswith("error: ValueError: unknown token mixer")
    with pytest.raises(SystemExit):
        bench.main(["--mixers", "mixshift", "--shapes", "20x7"])


def test_timing_and_kwargs_are_the_benchmark_tools(bench, monkeypatch, capsys):
    """One timer (torch.utils.benchmark / triton do_bench via tools/benchmark.py) and timm's kwargs parser."""
    actions = {a.dest: a for a in bench.build_parser()._actions}
    assert isinstance(actions["model_kwargs"], timm.utils.ParseKwargs)
    assert isinstance(actions["mixer_kwargs"], timm.utils.ParseKwargs)
    with pytest.raises(SystemExit):
        bench.main(["zoo_metaformer", "--model-kwargs", "depths"] + FAST)
    assert "is not key=value" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(bench, "measure_ms", lambda fn, device, warmup, min_run_time: seen.append(
        (fn(), device.type, warmup, min_run_time)) or 2.5)
    out = bench.time_module(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), {}, 3, torch.device("cpu"), warmup=2,
                            min_run_time=0.3, backward=True)
    assert out == dict(fwd_ms=2.5, fwd_bwd_ms=2.5) and seen == [(None, "cpu", 2, 0.3)] * 2
