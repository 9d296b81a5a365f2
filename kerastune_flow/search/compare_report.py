"""What a comparison leaves for people: the recommendation computed from the measured numbers,
and report.md / report.html (through the shared `reports.Report`), in words a reader uses
("30 %" of the training split, "540 training images")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kerastune_flow import reports
from kerastune_flow.reports import plots

FROM_SCRATCH = "cnn"  # the approach trained from scratch, which the data-size sweep weighs transfer against
CAUTION = (
    "This comparison is meaningless for transfer learning: no pre-trained weights were available, so the "
    "transfer approaches started from random weights."
)


def percent(fraction: float) -> str:
    """A share of the training split as people write it: 1.0 -> "100 %", 0.3 -> "30 %"."""
    return f"{100 * fraction:.3g} %"


def share_text(fraction: float, train_images: int | None = None) -> str:
    """How much of the training split an approach trained on, in words: "all 1,800 training
    images", "540 training images (30 % of the training split)"; without a count, "all the
    training images" or "30 % of the training images"."""
    if train_images is None:
        return "all the training images" if fraction == 1 else f"{percent(fraction)} of the training images"
    if fraction == 1:
        return f"all {train_images:,} training images"
    return f"{train_images:,} training images ({percent(fraction)} of the training split)"


def recommend(report: dict[str, Any]) -> list[str]:
    """Sentences computed from the measured numbers (never canned text)."""
    rows = report["results"]
    full = max(r["fraction"] for r in rows)
    at_full = [r for r in rows if r["fraction"] == full]
    best = max(at_full, key=lambda r: r["test_accuracy"])
    fastest = max(at_full, key=lambda r: r["test_accuracy"] / max(r["train_seconds"] / 60, 1e-9))
    lines = [
        f"Best test accuracy: {best['approach']} with {100 * best['test_accuracy']:.1f} % "
        f"({best['train_images']} training images, {best['train_seconds']:.0f} s of training).",
        f"Most accuracy per minute of training: {fastest['approach']} "
        f"({100 * fastest['test_accuracy']:.1f} % in {fastest['train_seconds']:.0f} s).",
    ]
    others = [r for r in at_full if r is not best]
    if others:
        runner = max(others, key=lambda r: r["test_accuracy"])
        gap = 100 * (best["test_accuracy"] - runner["test_accuracy"])
        if gap < 0.05:
            lines.append(f"{best['approach']} and {runner['approach']} tie on test accuracy.")
        else:
            lines.append(f"{best['approach']} beats {runner['approach']} by {gap:.1f} points of accuracy.")
    lines += _sweep_finding(rows)
    if not report["meaningful"]:
        lines.append(
            "Caution: no pre-trained weights were available, so the transfer rows start from random weights; "
            "this comparison says nothing about transfer learning."
        )
    if report.get("source_accuracy_before") is not None:
        for r in (r for r in at_full if r["source_accuracy_after"] is not None):
            lines.append(
                f"Forgetting: on its own task the base went from {100 * report['source_accuracy_before']:.1f} % to "
                f"{100 * r['source_accuracy_after']:.1f} % after {r['approach']}; feature extraction leaves it "
                "unchanged."
            )
    return lines


def _sweep_finding(rows: list[dict[str, Any]]) -> list[str]:
    """With several training fractions and the CNN from scratch: the data size from which transfer
    stops helping, if it does."""
    fractions = sorted({r["fraction"] for r in rows})
    if len(fractions) < 2 or not any(r["approach"] == FROM_SCRATCH for r in rows):
        return []
    for f in fractions:
        at = {r["approach"]: r for r in rows if r["fraction"] == f}
        transfer = [r["test_accuracy"] for a, r in at.items() if a != FROM_SCRATCH]
        if FROM_SCRATCH in at and transfer and at[FROM_SCRATCH]["test_accuracy"] >= max(transfer):
            crossing = at[FROM_SCRATCH]
            return [
                f"Transfer stops helping at about {crossing['train_images']} training images "
                f"({percent(crossing['fraction'])} of the data): from there the CNN from scratch is as good or better."
            ]
    return ["Transfer beat training from scratch at every data size measured."]


COLUMNS = (
    ("approach", "approach", "{}"),
    ("fraction", "share of train", percent),
    ("train_images", "train images", "{:,}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("best_epoch", "best epoch", "{}"),
    ("epochs_run", "epochs", "{}"),
    ("train_seconds", "wall time s", "{:.1f}"),
    ("seconds_per_epoch", "s / epoch", "{:.2f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("total_params", "total params", "{:,}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("examples_seen", "examples seen", "{:,}"),
)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The results table's cells: one row per approach and training fraction, as `COLUMNS` says."""
    return [[reports.cell(r[key], fmt) for key, _, fmt in COLUMNS] for r in report["results"]]


def write_report(report: dict[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Writes the plots, report.md and a self-contained report.html (plots inlined as data URIs)."""
    run_dir = Path(run_dir)
    caution = None if report["meaningful"] else CAUTION
    # The caution stands apart, in bold (red in HTML), instead of as one more bullet.
    findings = [line for line in report["recommendation"] if not (caution and line.startswith("Caution:"))]
    page = reports.Report(
        title=f"Comparison on {report['data']}",
        findings=findings,
        caution=caution,
        notes=[f"Hardware: {report['hardware']}. Pre-trained weights: {report['pretrained']}. Date: {report['date']}."],
        header=[title for _, title, _ in COLUMNS],
        rows=table_rows(report),
        footnotes=["Peak RSS is the process's peak resident memory so far (it never decreases), after each approach."],
        figures=plots.comparison_plots(report, run_dir),
        page_title="kerastune_flow comparison",
    )
    return page.write(run_dir)
