"""``python -m metaformer_zoo list`` and the catalogue behind it.

Rows come from the family specs (``Variant.params`` / ``macs``): the default stage checks that they cover exactly the
catalogued variants and recomputes a few cheap rows; the slow stage recomputes every row. Also: family order (the README's Families table), CSV columns, the unknown-family error, and the ops'
autocast guards on every device type (the catalogue counts models on the meta device).
"""
import csv
import fnmatch
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import metaformer_zoo  # noqa: F401
from metaformer_zoo import zoo
from metaformer_zoo import __main__ as cli
from metaformer_zoo.__main__ import main
from metaformer_zoo.kernels import autocast_dtype, no_autocast
from metaformer_zoo.kernels import fft_filter as ff
from metaformer_zoo.kernels import selective_scan2d as ss
from metaformer_zoo.kernels import strip_mix as sm
from metaformer_zoo.kernels.fft_filter.reference import fft_filter_reference
from metaformer_zoo.spec import FamilySpec, Variant

ROOT = Path(__file__).resolve().parents[1]
NUM_VARIANTS = 63  # + hydraformer_s12/s24/s36, zoo_supernet
# rows cheap enough to recount in the default stage (RandFormer: frozen buffers; ViM2: the scan op on meta)
CHEAP_ROWS = ("randformer_s12", "affnet_et", "raftmlp_s", "vim2_tiny")


def _run_main(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _readme_family_rows():
    """Backticked name patterns of each row of the README's Families table, in table order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Families", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| family")]
    return [re.findall(r"`([^`]+)`", row.split("|")[2]) for row in rows]


def _readme_row_of(variant, rows):
    for i, tokens in enumerate(rows):
        if any(fnmatch.fnmatch(variant, t) or variant == t.split("/")[0] for t in tokens):
            return i
    return None


def test_family_order_is_the_readme_table_order():
    fams = [f.name for f in zoo.list_families()]
    assert fams == list(zoo.FAMILY_ORDER)
    rows = _readme_family_rows()
    idx = [_readme_row_of(f.variants[0], rows) for f in zoo.list_families()]
    assert None not in idx, dict(zip(fams, idx))
    assert idx == sorted(idx), f"families out of README order: {list(zip(fams, idx))}"
    assert zoo.list_variants()[:2] == ["poolformer_s12", "poolformer_s24"]
    assert zoo.list_variants()[-1] == "zoo_metaformer"


def test_family_outside_the_order_comes_last():
    zoo.register_family(FamilySpec("zz_extra", (Variant("resnet18"),), owner="timm"))
    try:
        assert [f.name for f in zoo.list_families()][-1] == "zz_extra"
        assert zoo.variant_info("resnet18", macs=False)["source"] == "measured"  # not in the table: counted now
    finally:
        zoo._FAMILIES.pop("zz_extra")


def test_catalogue_covers_every_variant_at_its_input_size():
    stored = zoo.load_catalogue()
    assert list(stored) == zoo.list_variants() and len(stored) == NUM_VARIANTS
    for name, row in stored.items():
        assert tuple(row["input_size"]) == zoo._default_input_size(name), name
        assert row["params"] == row["trainable_params"] + row["frozen_buffers"], name
        assert row["macs"] > 0


@pytest.mark.parametrize("name", CHEAP_ROWS)
def test_cheap_rows_match_a_fresh_count(name):
    fresh = zoo.variant_info(name, recompute=True)
    info = zoo.variant_info(name)
    assert fresh["source"] == "measured" and info["source"] == "catalogue"
    assert fresh == dict(info, source="measured")


def test_randformer_frozen_buffers_in_the_catalogue():
    info = zoo.variant_info("randformer_s12")
    # official sum(p.numel()) = 12,127,010 = 11,891,712 trainable + 196^2 * 6 + 49^2 * 2 frozen
    assert (info["params"], info["trainable_params"], info["frozen_buffers"]) == (
        12_127_010, 11_891_712, 6 * 196 ** 2 + 2 * 49 ** 2)


def test_list_counts_nothing_when_the_catalogue_has_every_row(capsys, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("list built a model although every row is in the catalogue")

    monkeypatch.setattr(timm, "create_model", no_build)
    rc, out, err = _run_main(capsys, "list")
    assert rc == 0
    assert f"{NUM_VARIANTS} variants in {len(zoo.FAMILY_ORDER)} families" in out
    assert "11.89M+0.24M frozen buffer" in next(line for line in out.splitlines() if line.startswith("randformer_s12"))


def test_list_command_prints_every_row_in_family_order():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "metaformer_zoo", "list"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["model", "family", "owner", "params", "GMACs", "input", "weights"]
    rows = [line.split() for line in lines[2:2 + NUM_VARIANTS]]
    assert [r[0] for r in rows] == zoo.list_variants()
    assert all(float(r[-3]) > 0 for r in rows)  # GMACs for every row
    assert lines[-1] == f"{NUM_VARIANTS} variants in {len(zoo.FAMILY_ORDER)} families"


def test_csv_columns(capsys):
    rc, out, _ = _run_main(capsys, "list", "--format", "csv")
    assert rc == 0
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(out))}
    assert list(rows) == zoo.list_variants()
    assert {r["weights"] for r in rows.values()} == {"yes", "no"}
    assert rows["randformer_s12"]["weights"] == "yes" and rows["randformer_s12"]["weights_source"].endswith(".pth")
    assert rows["raftmlp_s"]["weights"] == "no" and rows["raftmlp_s"]["weights_source"] == ""
    r = rows["randformer_s12"]
    assert (int(r["params"]), int(r["trainable_params"]), int(r["frozen_buffers"])) == (12_127_010, 11_891_712,
                                                                                         235_298)
    assert r["input_size"] == "224x224" and rows["affnet"]["input_size"] == "256x256"
    rc, out, _ = _run_main(capsys, "list", "--family", "vim2", "--no-macs", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["name"] for r in rows] == ["vim2_tiny", "vim2_small", "vim2_base"]
    assert all(r["macs"] == "" and int(r["params"]) > 0 for r in rows)


def test_unknown_family_is_one_line_and_exit_2(capsys):
    rc, out, err = _run_main(capsys, "list", "--family", "nosuch")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "unknown family 'nosuch'" in err and "randformer" in err and "poolformer" in err


def test_check_reports_a_spec_that_is_wrong(capsys, monkeypatch):
    """``check`` compares the declared numbers with a fresh count and names the variant whose spec is wrong."""
    monkeypatch.setattr(cli, "list_variants", lambda *a, **k: ["affnet_et", "randformer_s12"])
    rc, out, _ = _run_main(capsys, "check")
    assert rc == 0 and "2 of 2 variants match their spec" in out
    real = zoo.declared_row
    monkeypatch.setattr(zoo, "declared_row", lambda n: dict(real(n), params=1) if n == "affnet_et" else real(n))
    rc, out, _ = _run_main(capsys, "check")
    assert rc == 1 and out.startswith("affnet_et: spec declares") and "1 of 2 variants" in out


def test_results_csv_is_generated_from_the_specs(capsys):
    rc, out, _ = _run_main(capsys, "results")
    assert rc == 0
    assert (ROOT / "model_cards" / "results.csv").read_text() == out, \
        "model_cards/results.csv differs from the specs: run `python -m metaformer_zoo results --write " \
        "model_cards/results.csv`"
    rows = list(csv.DictReader(line for line in io.StringIO(out) if not line.startswith("#")))
    assert {r["model"] for r in rows} == set(zoo.published_results())


def test_autocast_guards_on_every_device_type():
    for dev in ("meta", "cpu", "cuda"):
        with no_autocast(dev):
            assert autocast_dtype(dev) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        with no_autocast("cpu"):
            assert not torch.is_autocast_enabled("cpu")
    # every op (reference path) on meta tensors, as when a model is counted on the meta device
    m = dict(device="meta")
    Bsz, C, H, W, N, G = 1, 2, 3, 4, 2, 2
    L = H * W
    out = ss.selective_scan2d(torch.empty(Bsz, C, H, W, **m), torch.empty(Bsz, 4, C, L, **m),
                              torch.empty(4 * C, N, **m), torch.empty(Bsz, 4, N, L, **m),
                              torch.empty(Bsz, 4, N, L, **m), torch.empty(4 * C, **m), backend="reference")
    assert out.shape == (Bsz, C, H, W) and out.is_meta
    out = ss.selective_scan(torch.empty(Bsz, C, L, **m), torch.empty(Bsz, C, L, **m), torch.empty(C, N, **m),
                            torch.empty(Bsz, 1, N, L, **m), torch.empty(Bsz, 1, N, L, **m), backend="reference")
    assert out.shape == (Bsz, C, L) and out.is_meta
    args = (torch.empty(Bsz, C, H, W, **m), torch.empty(2, G, 1, 3, **m), torch.empty(2, G, 3, **m),
            torch.empty(2, G, 3, 1, **m), torch.empty(2, G, 1, **m))
    assert ff.fft_filter(*args, num_groups=G, backend="reference").is_meta
    assert fft_filter_reference(*args, num_groups=G).is_meta
    assert sm.strip_mix(torch.empty(Bsz, C, H, W, **m), torch.empty(1, H, H, 1, **m), backend="reference").is_meta


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.list_variants())
def test_stored_row_equals_a_fresh_count(name):
    declared = zoo.declared_row(name)
    fresh = zoo.measure_variant(name)
    assert fresh == declared, f"the {zoo.family_of(name).name} spec declares other numbers for {name} than it counts"
