"""Importing metaformer_zoo must not change any timm registry entry or pretrained tag, and lists every family."""
import subprocess
import sys
import textwrap

import pytest


def test_import_changes_no_timm_entry():
    code = textwrap.dedent("""
        import warnings, json
        import timm
        from timm.models import model_entrypoint, get_pretrained_cfg
        def snap():
            entries = {n: (model_entrypoint(n).__module__, model_entrypoint(n).__qualname__) for n in timm.list_models()}
            tags = sorted(timm.list_models(pretrained=True))
            return entries, tags
        before, tags_before = snap()
        cfg_before = get_pretrained_cfg('caformer_s18.sail_in1k').to_dict()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            import metaformer_zoo
        overwrite = [str(x.message) for x in w if 'Overwriting' in str(x.message)]
        after, tags_after = snap()
        changed = [n for n in before if after.get(n) != before[n]]
        new = [n for n in after if n not in before]
        lost_tags = sorted(set(tags_before) - set(tags_after))
        print(json.dumps(dict(overwrite=overwrite, changed=changed, new=new, lost_tags=lost_tags,
                              cfg_same=get_pretrained_cfg('caformer_s18.sail_in1k').to_dict() == cfg_before)))
    """)
    import json
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["overwrite"] == [], res["overwrite"]
    assert res["changed"] == [], res["changed"]
    assert res["lost_tags"] == [], res["lost_tags"][:10]
    assert res["cfg_same"]
    assert "identityformer_s12" in res["new"] and "randformer_m48" in res["new"]
    # every new name lives in the zoo package
    assert all(not n.startswith(("caformer", "convformer", "poolformer", "mambaout")) for n in res["new"])


def test_catalogue_lists_every_family():
    import timm
    import metaformer_zoo
    from metaformer_zoo.zoo import list_families, list_variants

    fams = {f.name: f for f in list_families()}
    for name in ("poolformer", "poolformerv2", "convformer", "caformer", "mambaout", "identityformer", "randformer"):
        assert name in fams
    for name in ("poolformer", "poolformerv2", "convformer", "caformer", "mambaout"):
        assert fams[name].owner == "timm"
        for v in fams[name].variants:  # served from timm: the entrypoint is timm's own
            assert timm.models.model_entrypoint(v).__module__.startswith("timm.models.")
    assert len(list_variants("identityformer")) == 5 and len(list_variants("randformer")) == 5
    assert len(list_variants("caformer")) == 4 and len(list_variants("mambaout")) == 5


def test_unknown_names_give_clear_errors():
    import timm
    import metaformer_zoo
    from metaformer_zoo.mixers import get_mixer
    from metaformer_zoo.zoo import family_of, list_variants

    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("identityformer_s99")
    with pytest.raises(ValueError, match="not a zoo variant"):
        family_of("resnet50")
    with pytest.raises(ValueError, match="unknown family"):
        list_variants("nosuchfamily")
    with pytest.raises(ValueError, match="registered mixers"):
        get_mixer("nosuchmixer")
