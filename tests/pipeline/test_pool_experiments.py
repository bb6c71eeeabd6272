"""The pool block of the job's config reaches every member's experiment (no Ray needed)."""

from __future__ import annotations

from merging.pipeline.pool_stage import recipe_experiments
from tests.support import tiny_pipeline
from training.config import ExperimentConfig

RECIPES = [{"name": "plain"}, {"name": "cl4srec"}]


def test_a_shared_initialisation_gives_every_member_the_experiment_seed() -> None:
    config = tiny_pipeline(
        setting="population", pool={"shared_init": True}, recipes=RECIPES, experiment__train__seed=5
    )
    members = recipe_experiments(config)
    assert [m["train"]["init_seed"] for m in members.values()] == [5, 5]
    # ...while each keeps its own seed for data order and dropout.
    assert len({m["train"]["seed"] for m in members.values()}) == 2
    for experiment in members.values():
        ExperimentConfig.model_validate(experiment)


def test_members_start_from_their_own_initialisations_by_default() -> None:
    for setting in ("population", "scratch"):
        members = recipe_experiments(tiny_pipeline(setting=setting, recipes=RECIPES))
        assert [m["train"]["init_seed"] for m in members.values()] == [None, None]


def test_the_report_names_the_pull_as_configured() -> None:
    from merging.pipeline.publish import describe_pool
    from training.pool import PoolConfig

    def line(**settings: object) -> str | None:
        pool = PoolConfig(strategy="population", **settings).model_dump(mode="json")  # type: ignore[arg-type]
        return describe_pool({**pool, "members": 2, "member_epochs_budget": 30})

    assert (
        line(pull=0.05)
        == "population (pull 0.05 every 10 steps): 2 members, 30 member-epochs at most"
    )
    assert str(line(pull_per_epoch=0.15)).startswith("population (pull 0.15 per epoch)")
    assert str(line(shared_init=True)).startswith(
        "population (pull 0.05 every 10 steps, one initialisation)"
    )
    assert str(line(pull_schedule="cosine", shared_init=True)).startswith(
        "population (pull 0.05 every 10 steps, cosine decay, one initialisation)"
    )
