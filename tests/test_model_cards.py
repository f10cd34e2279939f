"""Model cards: every catalogued family has its card, naming every variant, with a variants table and a citation;
results.csv holds an official top-1 for every catalogued variant that has an official README number."""
import csv
from pathlib import Path

import pytest

import metaformer_zoo  # noqa: F401
from metaformer_zoo import hub, zoo

CARDS = Path(__file__).resolve().parents[1] / "model_cards"
FAMILIES = [f for f in zoo.list_families() if f.name != "composed"]


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_family_card(family):
    fam = next(f for f in FAMILIES if f.name == family)
    path = CARDS / f"{fam.card}.md"
    assert path.is_file(), f"missing model card {path} for family {family}"
    text = path.read_text()
    missing = [v for v in fam.variants if v not in text]
    assert not missing, f"{path.name} does not mention {missing}"
    assert "|---" in text, "no variants table"
    assert "@" in text and "Citation" in text, "no citation"
    assert path.name in (CARDS / "README.md").read_text()


# families without a published ImageNet-1k top-1 (listed as such by `tools/benchmark.py --plot`, never dropped)
NO_PUBLISHED_TOP1 = {"composed", "hydraformer", "supernet"}  # hydraformer: a zoo composition, not trained yet


def test_results_csv():
    rows = list(csv.DictReader(line for line in open(CARDS / "results.csv") if not line.startswith("#")))
    assert rows and set(rows[0]) == {"model", "top1", "source"}
    results = hub.official_results()
    assert len(results) == len(rows), "duplicate or unparsable rows in results.csv"
    for name, (top1, source) in results.items():
        assert zoo.family_of(name) and 0 < top1 < 100 and source


@pytest.mark.parametrize("family", [f.name for f in zoo.list_families()])
def test_results_csv_covers_family(family):
    """Every variant of a family with a published top-1 has its row, and the number is the one its card lists."""
    fam = next(f for f in zoo.list_families() if f.name == family)
    results = hub.official_results()
    have = [v for v in fam.variants if v in results]
    if family in NO_PUBLISHED_TOP1:
        assert not have, f"{family} is listed as having no published top-1 but results.csv has {have}"
        return
    missing = [v for v in fam.variants if v not in results]
    assert not missing, f"results.csv lacks the published top-1 of {missing} (see model_cards/{fam.card}.md)"
    card = (CARDS / f"{fam.card}.md").read_text()
    for v in fam.variants:
        top1, source = results[v]
        assert f"{top1:.1f}" in card, f"{v}: top-1 {top1} is not in model_cards/{fam.card}.md"
        if "README" not in source:  # paper-only numbers say so, and why
            assert source.startswith("paper arXiv") and "(" in source, f"{v}: source {source!r}"


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_card_carries_the_spec_numbers(family):
    """The card's row of each variant shows the parameter count its spec declares (exact, or in M to 3 decimals)."""
    fam = next(f for f in FAMILIES if f.name == family)
    card = (CARDS / f"{fam.card}.md").read_text().splitlines()
    for v in fam.models:
        assert v.params is not None, f"{v.name}: the {family} spec declares no parameter count"
        rows = [line for line in card if line.startswith("|") and (f"`{v.name}`" in line or f"| {v.name} " in line)]
        shown = (f"{v.params:,}", f"{v.params / 1e6:.3f}", f"{(v.params - v.frozen_params):,}")
        assert any(s in r for r in rows for s in shown), \
            f"model_cards/{fam.card}.md: no table row of {v.name} shows its {v.params:,} params"
