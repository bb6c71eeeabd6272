"""The run report: report.md and the plots people would rather see than read.

- the metric table of every model under the three candidate settings;
- validation NDCG@10 per epoch for every trained model;
- mean Fisher information per layer for every recipe;
- thesis Fig. 4.5: the weights of the recipes and of the merged models,
  projected on the plane through the three best recipes;
- thesis Fig. 4.6: sorted next-item probabilities of the published model for a
  few test sequences.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and workers
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from merging.landscape import Plane, Probe, flat_weights, line_profile, plane_landscape
from training.evaluate import SETTINGS, format_table
from training.model import SequenceRecommender

log = logging.getLogger(__name__)

PLOTS = "plots"


def layer_of(name: str) -> str:
    """Group a parameter name by layer: 'blocks.0.attn.qkv.weight' -> 'blocks.0'."""
    match = re.match(r"(blocks\.\d+)\.", name)
    return match.group(1) if match else name.split(".")[0]


def fisher_per_layer(fisher: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean Fisher value of the parameters of each layer."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, values in fisher.items():
        layer = layer_of(name)
        sums[layer] = sums.get(layer, 0.0) + float(values.double().sum())
        counts[layer] = counts.get(layer, 0) + values.numel()
    return {layer: sums[layer] / counts[layer] for layer in sums}


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_validation_curves(
    histories: Mapping[str, list[dict[str, Any]]],
    path: Path,
    offsets: Mapping[str, int] | None = None,
) -> None:
    """Validation NDCG@10 per epoch; `offsets` shift fine-tuned runs to start after their base."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history in histories.items():
        shift = (offsets or {}).get(name, 0)
        points = [
            (e["epoch"] + shift, e["valid"]["full"]["ndcg@10"]) for e in history if "valid" in e
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    ax.set(xlabel="epoch", ylabel="validation NDCG@10 (full)", title="Validation curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_fisher_layers(fishers: Mapping[str, Mapping[str, Tensor]], path: Path) -> None:
    per_recipe = {name: fisher_per_layer(f) for name, f in fishers.items()}
    layers = sorted({layer for values in per_recipe.values() for layer in values})
    fig, ax = plt.subplots(figsize=(max(7, len(layers) * 0.9), 4))
    width = 0.8 / max(1, len(per_recipe))
    for i, (name, values) in enumerate(per_recipe.items()):
        xs = [j + i * width for j in range(len(layers))]
        ax.bar(
            xs, [max(values.get(layer, 0.0), 1e-30) for layer in layers], width=width, label=name
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=30, ha="right"
    )
    ax.set(yscale="log", ylabel="mean diagonal Fisher", title="Fisher information per layer")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_weight_plane(
    anchors: Mapping[str, Mapping[str, Tensor]],
    others: Mapping[str, Mapping[str, Tensor]],
    path: Path,
    landscape: Mapping[str, Any] | None = None,
) -> None:
    """Thesis Fig. 4.5: recipes (anchors) and merged models on the anchors' plane.

    With a `landscape` (merging/landscape.py), validation NDCG@10 is drawn as
    filled contours under the points, as model-soup papers draw it.
    """
    if landscape is not None:
        coords = landscape["points"]
    else:
        flats = {name: flat_weights(state) for name, state in {**anchors, **others}.items()}
        plane = Plane.through([flats[n] for n in anchors])
        coords = {name: plane.coords(flat) for name, flat in flats.items()}
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if landscape is not None:
        filled = ax.contourf(
            landscape["x"], landscape["y"], landscape["ndcg@10"], levels=14, cmap="viridis"
        )
        fig.colorbar(filled, ax=ax, label="validation NDCG@10 (user subset)")
    for position, (name, (x, y)) in enumerate(coords.items()):
        marker, color = ("o", "white") if name in anchors else ("*", "tab:red")
        ax.scatter(
            [x], [y], marker=marker, s=110 if marker == "*" else 50, color=color, edgecolors="black"
        )
        # Merged models often sit on top of each other: stagger their labels.
        ax.annotate(
            name,
            (x, y),
            textcoords="offset points",
            xytext=(6, 6 - 11 * (position % 3)),
            fontsize=9,
        )
    ax.set(
        title="Weights on the plane of the three best recipes",
        xlabel="direction 1",
        ylabel="direction 2",
    )
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_line_profile(profile: Mapping[str, list[float]], start: str, end: str, path: Path) -> None:
    """Validation NDCG@10 and loss along the line from model `start` (t=0) to `end` (t=1)."""
    fig, left = plt.subplots(figsize=(6.5, 4))
    left.plot(profile["t"], profile["ndcg@10"], "o-", color="tab:blue")
    left.set(xlabel=f"t: (1 - t) {start} + t {end}", ylabel="validation NDCG@10 (user subset)")
    right = left.twinx()
    right.plot(profile["t"], profile["loss"], "s--", color="tab:orange")
    right.set_ylabel("validation next-item loss", color="tab:orange")
    for t in (0.0, 1.0):
        left.axvline(t, color="grey", alpha=0.4)
    left.set_title(f"Between {start} and {end}")
    left.grid(alpha=0.3)
    _save(fig, path)


def plot_sorted_probabilities(model: SequenceRecommender, histories: Tensor, path: Path) -> None:
    """Thesis Fig. 4.6: how peaked the next-item distribution is, per sequence."""
    with torch.inference_mode():
        probabilities = torch.softmax(model.eval().logits(histories), dim=-1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, values in enumerate(probabilities):
        ranked = values.sort(descending=True).values
        ax.plot(torch.arange(1, len(ranked) + 1), ranked, label=f"sequence {row + 1}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="item rank",
        ylabel="p(item | sequence)",
        title="Sorted next-item probabilities",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def metrics_section(
    metrics: Mapping[str, Mapping[str, Any]], exclude_seen: bool, protocol: str
) -> str:
    lines = []
    for part in ("valid", "test"):
        rows = {name: doc[part] for name, doc in metrics.items()}
        lines += [f"### {part}", "", format_table(rows), ""]
    note = "excluded" if exclude_seen else "ranked"
    lines.append(
        f"Protocol: {protocol}. Settings: {', '.join(SETTINGS)}; history items {note} in `full`; "
        "ties counted by their expectation under a random order."
    )
    return "\n".join(lines)


def comparison_section(
    best: str, rows: Mapping[str, Mapping[str, Any]], protocol: str = "leave-one-out"
) -> list[str]:
    """Every model against the best recipe: paired per-user test NDCG@10."""
    users = next(iter(rows.values()))["users"] if rows else 0
    lines = [
        "## Against the best recipe",
        "",
        f"Best recipe on validation: **{best}**. Test NDCG@10 ({protocol}, full ranking), "
        "paired over "
        f"{users} users; the ensemble averages the pool's log-probabilities (M times the "
        "serving cost): a merge that keeps 100% of its gain matches it at 1x.",
        "",
        "| model | test NDCG@10 | vs best recipe | 95% CI of the difference | p (paired t-test) "
        "| share of the ensemble's gain |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        share = row.get("ensemble_gain_share")
        lines.append(
            f"| {name} | {row['mean_a']:.4f} | {row['relative']:+.1%} | "
            f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] | {row['p_ttest']:.3g} | "
            f"{'-' if share is None else f'{share:.0%}'} |"
        )
    return [*lines, ""]


def write_report(
    out: Path,
    *,
    title: str,
    summary: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any]],
    histories: Mapping[str, list[dict[str, Any]]],
    epoch_offsets: Mapping[str, int],
    fishers: Mapping[str, Mapping[str, Tensor]],
    recipe_weights: Mapping[str, Mapping[str, Tensor]],
    merged_weights: Mapping[str, Mapping[str, Tensor]],
    published: SequenceRecommender,
    sample_histories: Tensor,
    stage_seconds: Mapping[str, float],
    exclude_seen: bool = True,
    comparisons: tuple[str, Mapping[str, Mapping[str, Any]]] | None = None,
    probe: Probe | None = None,
    grid_points: int = 7,
    line_points: int = 15,
    protocol: str = "leave-one-out",
) -> Path:
    """Write report.md and plots/*.png into `out`; returns the report's path.

    With a `probe` (validation users), the weight plane gets NDCG@10 contours
    and the line from the best recipe to the best merged model is profiled.
    """
    plots = out / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}", ""]
    sections += [f"- **{key}**: {value}" for key, value in summary.items()]
    sections += ["", "## Metrics", "", metrics_section(metrics, exclude_seen, protocol), ""]
    if comparisons is not None:
        sections += comparison_section(*comparisons, protocol=protocol)

    plot_validation_curves(histories, plots / "validation_curves.png", epoch_offsets)
    sections += [
        "## Validation curves",
        "",
        f"![validation curves]({PLOTS}/validation_curves.png)",
        "",
    ]
    if fishers:
        plot_fisher_layers(fishers, plots / "fisher_per_layer.png")
        sections += [
            "## Fisher information per layer",
            "",
            f"![Fisher per layer]({PLOTS}/fisher_per_layer.png)",
            "",
        ]
    sections += _weight_sections(
        metrics, recipe_weights, merged_weights, published, plots, probe, grid_points, line_points
    )
    plot_sorted_probabilities(published, sample_histories, plots / "sorted_probabilities.png")
    sections += [
        "## Next-item probabilities of the published model (thesis Fig. 4.6)",
        "",
        f"![sorted probabilities]({PLOTS}/sorted_probabilities.png)",
        "",
    ]
    sections += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
    sections += [f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_seconds.items()]
    report = out / "report.md"
    report.write_text("\n".join(sections) + "\n")
    log.info("report written to %s", report)
    return report


def _validation(metrics: Mapping[str, Mapping[str, Any]], name: str) -> float:
    return float(metrics[name]["valid"]["full"]["ndcg@10"])


def _weight_sections(
    metrics: Mapping[str, Mapping[str, Any]],
    recipe_weights: Mapping[str, Mapping[str, Tensor]],
    merged_weights: Mapping[str, Mapping[str, Tensor]],
    template: SequenceRecommender,
    plots: Path,
    probe: Probe | None,
    grid_points: int,
    line_points: int,
) -> list[str]:
    """The weight plane (with contours given a probe) and the best-recipe-to-merge line."""
    best = sorted(recipe_weights, key=lambda n: -_validation(metrics, n))[:3]
    if len(best) < 3:
        return [
            "## Weights of recipes and merged models",
            "",
            "Needs three recipes; this run has fewer.",
            "",
        ]
    anchors = {n: recipe_weights[n] for n in best}
    landscape = None
    if probe is not None:
        log.info(
            "report: validation NDCG@10 on a %dx%d grid of the weight plane",
            grid_points,
            grid_points,
        )
        landscape = plane_landscape(anchors, merged_weights, template, probe, grid_points)
    plot_weight_plane(anchors, merged_weights, plots / "weight_plane.png", landscape)
    users = (
        f" Contours: validation NDCG@10 of the models on the plane ({len(probe.split)} users)."
        if probe
        else ""
    )
    sections = [
        "## Weights of recipes and merged models (thesis Fig. 4.5)",
        "",
        f"Plane through the three best recipes on validation: {', '.join(best)}.{users}",
        "",
        f"![weight plane]({PLOTS}/weight_plane.png)",
        "",
    ]
    if probe is None or not merged_weights:
        return sections
    merged = max(merged_weights, key=lambda n: _validation(metrics, n))
    profile = line_profile(
        recipe_weights[best[0]], merged_weights[merged], template, probe, line_points
    )
    plot_line_profile(profile, best[0], merged, plots / "line_profile.png")
    sections += [
        "## Between the best recipe and the best merge",
        "",
        f"Validation NDCG@10 and loss along the straight line from {best[0]} (t = 0) to "
        f"{merged} (t = 1), {len(probe.split)} users; a dip between them is a barrier.",
        "",
        f"![line profile]({PLOTS}/line_profile.png)",
        "",
    ]
    return sections
