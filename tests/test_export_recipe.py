"""Export recipes are data, checked field by field."""

import json

import pytest

from gata_ft.errors import ConfigError
from gata_ft.export.recipe import Recipe, Thresholds


def test_recipes_load_as_data():
    names = {}
    for name in ("avx2", "avx512_vnni", "arm64"):
        recipe = Recipe.load(name)
        names[name] = recipe.variants[0].preset
        assert recipe.variants[0].label == "base"
        assert len(recipe.variants) >= 3
        assert recipe.parity == Thresholds(1.0, 1.0, 0.05, 0.97)
    assert names == {"avx2": "avx512", "avx512_vnni": "avx512_vnni", "arm64": "arm64"}
    avx2 = Recipe.load("avx2")
    assert avx2.escalate_below == 0.5  # unsure int8 answers are scored again in fp32
    assert avx2.variants[0].reduce_range is True  # no saturation on CPUs without VNNI
    assert avx2.variants[2].exclude_most_sensitive == 6
    assert avx2.variants[3].preset == "avx2"


def test_unknown_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        Recipe.load("sse4")
    assert str(info.value) == (
        "recipe 'sse4': expected one of arm64, avx2, avx512_vnni or a path to a recipe "
        ".json file, found no such recipe"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**Recipe.load("avx2").source, "quantization": {"per_chanel": True}}))
    with pytest.raises(ConfigError, match=r"unknown quantization settings \['per_chanel'\]"):
        Recipe.load(bad)
    bad.write_text(json.dumps({**Recipe.load("avx2").source, "escalate_below": 1.5}))
    with pytest.raises(ConfigError, match="escalate_below: expected a probability from 0 to 1"):
        Recipe.load(bad)
