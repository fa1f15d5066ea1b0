"""mergekit YAML recipes map onto our merges; what we cannot honour is one error naming the key."""

from __future__ import annotations

import pytest

from p2pmodel.merge.recipe import RecipeError, parse_recipe


def recipe(**top) -> dict:
    return {"merge_method": "dare_ties", "base_model": "base",
            "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 0.5, "density": 0.3}},
                       {"model": "b", "parameters": {"weight": 0.2}}], **top}


def test_per_model_values_fall_back_to_the_global_ones():
    r = parse_recipe(recipe(parameters={"density": 0.7, "lambda": 0.9, "rescale": False, "int8_mask": True}))
    assert r.method == "dare_ties" and r.base == "base" and r.models == ["a", "b"]
    assert r.params == {"weights": [0.5, 0.2], "density": [0.3, 0.7], "lambda_": 0.9, "rescale": "none"}


def test_dtype_sets_the_output_dtype_and_out_dtype_wins():
    assert parse_recipe(recipe(dtype="bfloat16")).out_dtype == "bfloat16"
    assert parse_recipe(recipe(dtype="bfloat16", out_dtype="float32")).out_dtype == "float32"


def test_slerp_takes_the_base_as_v0_and_t():
    r = parse_recipe({"merge_method": "slerp", "base_model": "x", "models": [{"model": "x"}, {"model": "y"}],
                      "parameters": {"t": 0.3}})
    assert (r.base, r.models, r.params) == ("x", ["y"], {"t": 0.3})


@pytest.mark.parametrize("data,key", [
    (recipe(merge_method="della"), "merge_method"),
    (recipe(tokenizer_source="union"), "tokenizer_source"),
    (recipe(slices=[{"sources": []}]), "slices"),
    (recipe(parameters={"t": 0.5}), "parameters.t"),
    (recipe(parameters={"density": [0.1, 0.9]}), "parameters.density"),
    (recipe(parameters={"density": [{"filter": "mlp", "value": 0.5}]}), "parameters.density"),
    (recipe(typo=1), "typo"),
    (recipe(dtype="int8"), "dtype"),
    (recipe(base_model=None), "base_model"),
])
def test_what_we_cannot_honour_names_the_key(data, key):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, "r.yml")
    assert e.value.key == key and str(e.value).startswith(f"r.yml: {key}: ")
