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


def test_results_csv():
    rows = list(csv.DictReader(line for line in open(CARDS / "results.csv") if not line.startswith("#")))
    assert rows and set(rows[0]) == {"model", "top1", "source"}
    results = hub.official_results()
    assert len(results) == len(rows)
    for name, (top1, source) in results.items():
        assert zoo.family_of(name) and 0 < top1 < 100 and source
    for family in ("poolformer", "poolformerv2", "identityformer", "randformer", "convformer", "caformer", "mambaout"):
        assert set(zoo.list_variants(family)) <= set(results)
