"""The demo's report: recall untrained vs trained, training curves, localization maps.

Everything in it is read back from what the steps wrote (``retrieval evaluate`` JSON, the
run's TensorBoard events, ``summary.json``, ``bluemarble.json``), never recomputed, so the
report states exactly what the commands produced.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .demo import DemoPlan, Step

log = logging.getLogger(__name__)

KS = ("1", "5", "10", "20", "100")


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under ``folder``, by tag, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in out.items()}


def plot_curves(scalars: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Loss and validation recall against optimizer updates, as one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves (pip install matplotlib)")
        return None
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss = scalars.get("train/loss", [])
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:blue")
    ax_loss.set(title="training loss", xlabel="update", ylabel="loss")
    for k, colour in (("1", "tab:red"), ("5", "tab:orange"), ("10", "tab:green")):
        pts = scalars.get(f"val/R@{k}", [])
        if pts:
            ax_val.plot(*zip(*pts), marker="o", color=colour, label=f"R@{k}")
    ax_val.set(title="validation recall", xlabel="update", ylabel="%")
    if ax_val.lines:
        ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _row(values: dict[str, float] | None) -> list[str]:
    return [f"{values[k]:.1f}" if values and k in values else "–" for k in KS]


def recall_table(untrained: dict, trained: dict, dedupe: bool) -> str:
    """Markdown: one row per region and the average, untrained | trained at each K."""
    key = "recall_dedupe" if dedupe else "recall"
    avg = "average_dedupe" if dedupe else "average"
    head = ["region", "queries"] + [f"R@{k}" for k in KS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    before = {r["name"]: r for r in untrained["regions"]}
    for r in trained["regions"]:
        b = before.get(r["name"], {})
        cells = [f"{u} → **{t}**" for u, t in zip(_row(b.get(key)), _row(r.get(key)))]
        lines.append(f"| {r['name']} | {r['queries']} | " + " | ".join(cells) + " |")
    cells = [f"{u} → **{t}**" for u, t in zip(_row(untrained.get(avg)), _row(trained.get(avg)))]
    lines.append("| **average** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def console_table(untrained: dict, trained: dict) -> str:
    """Plain text for the terminal: R@K untrained -> trained per region and the average."""
    cols = ["region", "queries"] + [f"R@{k}" for k in KS]
    rows = []
    before = {r["name"]: r for r in untrained["regions"]}
    for r in trained["regions"]:
        b = before.get(r["name"], {})
        rows.append([r["name"], str(r["queries"])] +
                    [f"{u} -> {t}" for u, t in zip(_row(b.get("recall")), _row(r["recall"]))])
    rows.append(["average", ""] + [f"{u} -> {t}" for u, t in
                                   zip(_row(untrained["average"]), _row(trained["average"]))])
    if trained.get("average_dedupe"):
        rows.append(["avg, dedupe", ""] + [
            f"{u} -> {t}" for u, t in zip(_row(untrained.get("average_dedupe")),
                                          _row(trained["average_dedupe"]))])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(vals, widths)))
    title = "recall (%) on the EarthLoc test regions, untrained -> trained"
    return "\n".join([title, fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def readme_table(untrained: dict, trained: dict) -> str:
    """The README's Results table: per region and average, plus the rotation-dedupe average."""
    lines = recall_table(untrained, trained, dedupe=False).splitlines()
    if trained.get("average_dedupe"):
        cells = [f"{u} → **{t}**" for u, t in zip(_row(untrained.get("average_dedupe")),
                                                   _row(trained["average_dedupe"]))]
        lines.append("| average, rotation dedupe | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_of(evaluation: dict, summary: dict) -> list[str]:
    """The environment lines of a finished demo: training's (``summary.json``) and, where it
    differs, the evaluation's."""
    from retrieval.environment import environment_lines

    train_env, eval_env = summary.get("environment"), evaluation.get("environment")
    lines = []
    if train_env:
        lines += ["Training:"] + environment_lines(train_env)
    if eval_env and {k: v for k, v in eval_env.items() if k != "seed"} != \
            {k: v for k, v in (train_env or {}).items() if k != "seed"}:
        lines += ["Evaluation:"] + environment_lines(eval_env)
    return lines


def results_table(demo: Path) -> str:
    """What the README's Results section pastes: the table, the date and the environment
    of a finished demo folder, read from what its steps wrote (never typed by hand)."""
    import datetime

    untrained, trained = _load(demo / "eval-untrained.json"), _load(demo / "eval-trained.json")
    if not untrained or not trained:
        raise FileNotFoundError(f"{demo} holds no finished demo (eval-untrained.json and "
                                "eval-trained.json): run python -m trainer demo first")
    summary = _load(demo / "train" / "summary.json")
    when = datetime.datetime.fromtimestamp((demo / "eval-trained.json").stat().st_mtime,
                                           datetime.timezone.utc).strftime("%Y-%m-%d")
    env = environment_of(trained, summary)
    return "\n".join([readme_table(untrained, trained), "", f"Measured {when} ({demo})."]
                     + [f"\n{ln}\n" if not ln.startswith("- ") else ln for ln in env]
                     if env else [readme_table(untrained, trained), "", f"Measured {when} "
                                  f"({demo}); no environment recorded."])


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def write_demo_report(plan: "DemoPlan", steps: Sequence["Step"], timings: dict[str, float]
                      ) -> tuple[Path, str]:
    """Write ``DIR/report.md`` (+ ``curves.png``); returns its path and the console table."""
    out = plan.out
    untrained, trained = _load(out / "eval-untrained.json"), _load(out / "eval-trained.json")
    summary, bm = _load(plan.run / "summary.json"), _load(plan.bm / "bluemarble.json")
    import yaml

    try:
        recipe = yaml.safe_load((plan.run / "config.yaml").read_text()) or {}
    except OSError:
        recipe = {}
    scalars = read_scalars(plan.run / "tensorboard") if (plan.run / "tensorboard").is_dir() else {}
    curves = plot_curves(scalars, out / "curves.png")
    model = recipe.get("model", {})
    pretrained = model.get("pretrained")
    db, qs = bm.get("database", {}), bm.get("queries", {})
    queries_used = summary.get("mined_queries")
    u1, t1 = untrained.get("average", {}).get("1"), trained.get("average", {}).get("1")
    maps = sorted(out.glob("localize*.png"))

    md = ["# streamloc demo: astronaut-style photographs localized on NASA's Blue Marble", ""]
    md += [
        f"- **Data**: {db.get('images', '?')} database mosaics ({len(bm.get('years', []))} "
        f"radiometric years of {db.get('images_per_year', {}).get('2021', '?')} Web Mercator "
        f"tiles at zooms {', '.join(map(str, bm.get('arguments', {}).get('zooms', [])))}), "
        f"{qs.get('train', '?')} training and {qs.get('test', '?')} test photographs "
        "(synthetic oblique views with clouds and haze; the test ones lie in the six EarthLoc "
        "test regions, never seen in training).",
        f"- **Model**: {model.get('backbone', '?')} + {model.get('aggregator', {}).get('name', '?')}"
        f" at {model.get('image_size', '?')} px, "
        + ("**random initialisation** (no pretrained weights can be downloaded here; set "
           "`model.pretrained=/path/to/weights` to start from a local file)."
           if not pretrained else f"initialised from `{pretrained}`."),
        f"- **Training**: {summary.get('updates', '?')} updates "
        f"({summary.get('epochs', '?')} epochs) of {recipe.get('data', {}).get('places_per_batch', '?')}"
        f" places × {recipe.get('data', {}).get('images_per_place', '?')} years"
        + (f" plus mined queries ({int(queries_used)} mined query images used in all)"
           if queries_used is not None else "")
        + (f", {summary['images_per_s']:.0f} images/s" if summary.get("images_per_s") else "")
        + (f", data wait {100 * summary['data_wait_fraction']:.1f}% of step time"
           if summary.get("data_wait_fraction") is not None else "") + ".",
        "- **Evaluation**: `RUN/init` (the same weights before the first step) against "
        "`RUN/final`, on each test region against the 2021 tiles within its radius, at 4 "
        "rotations; a query is correct at K when one of its top K tiles overlaps it.",
        f"- **Time**: {_minutes(timings.get('total', 0.0))} in all ("
        + ", ".join(f"{k} {_minutes(v)}" for k, v in timings.items() if k != "total" and v > 0)
        + ").", ""]
    if untrained and trained:
        md += ["## Recall@K (%): untrained → trained", "",
               recall_table(untrained, trained, dedupe=False), ""]
        if trained.get("average_dedupe"):
            md += ["With rotation dedupe (each tile counted once, at its best rotation):", "",
                   recall_table(untrained, trained, dedupe=True), ""]
        if u1 is not None and t1 is not None:
            ratio = t1 / u1 if u1 else math.inf
            md += [f"Average R@1: {u1:.1f}% untrained, {t1:.1f}% trained ({ratio:.1f}×).", ""]
    if curves:
        md += ["## Training curves", "", f"![loss and validation recall]({curves.name})", ""]
    if maps:
        md += ["## Localization", "",
               "Top-10 predicted footprints (red, numbered by rank) and the true footprint "
               "(green) over Blue Marble, with the photograph beside the map. All predictions "
               "are in `localize.geojson` (RFC 7946).", ""]
        md += [f"![localization {i}]({p.name})" for i, p in enumerate(maps)] + [""]
    md += ["## TensorBoard", "", "```bash", f"tensorboard --logdir {plan.run / 'tensorboard'}",
           "```", "", "## Reproduce each step", "", "```bash"]
    md += [s.shell() for s in steps] + ["```", ""]
    env = environment_of(trained, summary)
    if env:
        md += ["## Environment", "",
               "Trained weights are reproducible bit for bit with the same versions, on CPUs "
               "with the same vector extensions, with the same thread count and number of "
               "processes (benchmarks/train_determinism.py measures which change moves them).",
               ""]
        md += [ln if ln.startswith("- ") else f"{ln}" for ln in env] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    table = console_table(untrained, trained) if untrained and trained else "(no evaluation)"
    return path, table
