"""The recipe registry: every training objective, keyed by name.

Add a recipe by writing a module with a `Recipe` subclass and adding it here.
"""

from __future__ import annotations

from training.recipe_params import RECIPE_PARAMS
from training.recipes.base import BERT4Rec, Recipe, RecipeOutput, RecipeParams, SASRec
from training.recipes.cl4srec import CL4SRec
from training.recipes.duorec import DuoRec
from training.recipes.ehrec import EHRec
from training.recipes.kdsr import KDSR, FeatureRecipe

RECIPES: dict[str, type[Recipe]] = {
    "bert4rec": BERT4Rec,
    "sasrec": SASRec,
    "cl4srec": CL4SRec,
    "duorec": DuoRec,
    "ehrec": EHRec,
    "kdsr": KDSR,
}


if {name: cls.Params for name, cls in RECIPES.items()} != RECIPE_PARAMS:
    raise ImportError("training/recipe_params.py and RECIPES disagree on a recipe's parameters")


def needs_features(name: str) -> bool:
    """Whether recipe `name` learns from the item features (see FeatureRecipe)."""
    return name in RECIPES and issubclass(RECIPES[name], FeatureRecipe)


def build_recipe(name: str, params: dict, model_config, train, features=None) -> Recipe:  # type: ignore[no-untyped-def]
    """The recipe `name` with validated `params` for a model and its training sequences.

    A FeatureRecipe also gets the item `features` (training.item_features.ItemFeatures).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    recipe_cls = RECIPES[name]
    validated = recipe_cls.Params.model_validate(params)
    if issubclass(recipe_cls, FeatureRecipe):
        if features is None:
            raise ValueError(
                f"recipe {name!r} learns from item features: write them with "
                "`fishrec data features` (or set data.features)"
            )
        return recipe_cls(validated, model_config, train, features)
    return recipe_cls(validated, model_config, train)


__all__ = [
    "RECIPES",
    "FeatureRecipe",
    "Recipe",
    "RecipeOutput",
    "RecipeParams",
    "build_recipe",
    "needs_features",
]
