"""The recipe registry: every training objective, keyed by name.

Add a recipe by writing a module with a `Recipe` subclass and adding it here.
"""

from __future__ import annotations

from training.recipes.base import BERT4Rec, Recipe, RecipeOutput, RecipeParams, SASRec
from training.recipes.cl4srec import CL4SRec
from training.recipes.duorec import DuoRec
from training.recipes.ehrec import EHRec

RECIPES: dict[str, type[Recipe]] = {
    "bert4rec": BERT4Rec,
    "sasrec": SASRec,
    "cl4srec": CL4SRec,
    "duorec": DuoRec,
    "ehrec": EHRec,
}


def build_recipe(name: str, params: dict, model_config, train) -> Recipe:  # type: ignore[no-untyped-def]
    """The recipe `name` with validated `params` for a model and its training sequences."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    recipe_cls = RECIPES[name]
    return recipe_cls(recipe_cls.Params.model_validate(params), model_config, train)


__all__ = ["RECIPES", "Recipe", "RecipeOutput", "RecipeParams", "build_recipe"]
