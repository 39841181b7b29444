"""Commands that look at data: ``inspect`` a study, ``index`` a dataset, ``synth`` phantoms."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional
import typer
import typer.core
from msnet.errors import MsnetError
from msnet.cli.common import _json, app


@app.command()
def inspect(
    study: str = typer.Argument(..., help="DICOM folder, .nii/.nii.gz, image folder, image file, a .zip of any, "
                                "or DICOMweb study URL."),
    json_out: bool = typer.Option(False, "--json", help="Emit one JSON object."),
    series: Optional[str] = typer.Option(None, help="SeriesInstanceUID or index of the series to read."),
) -> None:
    """Read a study; print slices, spacing, z order, HU range, series chosen, lungs (volume, z-range), every
    check of the chest-CT gate with its value, warnings."""
    from msnet.io import describe, open_study
    from msnet.gates import check_lungs, gate_stats

    vol = open_study(study, series=series)
    info = describe(vol)
    if vol.kind == "hu":  # grey-level images have no HU: no lungs to measure
        stats = gate_stats(vol, coarse=False)  # the fine grid: the values a refusal is judged on
        info.update(stats.to_dict())
        info["checks"] = stats.checks
        try:
            check_lungs(vol, stats)
            info["lung_gate"] = "ok"
            info["warnings"] += stats.warnings
        except MsnetError as exc:
            info["lung_gate"] = "refused"
            info["warnings"].append(f"{exc.problem} (predict refuses it)")
    if json_out:
        typer.echo(_json(info))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {info['study_id']}", show_header=False)
    for key, value in info.items():
        if key in ("warnings", "z_mm", "checks") or key.startswith("lung"):
            continue
        table.add_row(key, str(value))
    z = info["z_mm"]
    if z:
        table.add_row("z_mm", f"{z[0]:.1f} … {z[-1]:.1f} ({'descending' if z[0] >= z[-1] else 'ascending'})")
    if "lung_volume_ml" in info:
        table.add_row("lung volume", f"{info['lung_volume_ml']:.0f} ml")
        if info["lung_slices"]:
            (s0, s1), (z0, z1) = info["lung_slices"], info["lung_z_mm"]
            table.add_row("lung z-range", f"slices {s0}-{s1} ({z0:.1f} … {z1:.1f} mm, "
                                          f"{info['lung_height_mm']:.0f} mm), {100 * info['lung_z_coverage']:.0f}% "
                                          f"of the slices")
        table.add_row("lung gate", info["lung_gate"])
        for c in info["checks"]:
            mark = {True: "ok", False: "FAILED" if c["refuses"] else "not found (reported only)", None: "n/a"}[c["ok"]]
            value = c["value"] if not isinstance(c["value"], dict) else ", ".join(f"{k} {v}" for k, v in c["value"].items())
            table.add_row(f"check: {c['name']}", f"{mark}: {value} (expected {c['expected']})")
    console = Console()
    console.print(table)
    for w in info["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")


@app.command()
def index(
    root: Path = typer.Argument(..., help="Dataset folder: COVID-CT-MD, COVIDx CT, MosMedData, CC-CCII, STOIC2021, "
                                "ROOT/<class>/<patient> folders or ROOT/<split>/<class>/ images."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder for cohort.csv / slice_labels.csv."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="User CSV with patient_id,label[,path,subset]."),
    strict: bool = typer.Option(False, help="Stop at the first study that fails to read."),
    check: bool = typer.Option(True, help="Read every study to check it (status/error columns)."),
    group_by: str = typer.Option("source", "--group-by",
                                 help="Slice images: the `group` that grouped folds keep together, `source` (patient, "
                                      "figure, numbering run) or `paper` (all images of the paper that the file name names)."),
    class_map: Optional[List[str]] = typer.Option(None, "--map", help="NAME=CLASS: give the dataset's class NAME "
                                                  "(a folder, MosMedData's CT-0 ... CT-4, STOIC2021's COVID / negative) "
                                                  "another class (repeat for several)."),
) -> None:
    """Build the cohort manifest (+ slice_labels.csv) from a dataset folder."""
    from msnet.data.cohorts import index_dataset

    pairs = [m.split("=", 1) for m in class_map or []]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise MsnetError(f"--map takes NAME=CLASS, got {', '.join(class_map or [])}", fix="e.g. --map CT-1=COVID-19")
    report = index_dataset(root, out, labels_csv=labels, strict=strict, check=check, group_by=group_by,
                           class_map=dict(pairs))
    typer.echo(report.summary())
    if report.n_failed:
        raise typer.Exit(1)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output folder."),
    patients: int = typer.Option(12, "--patients", "-n", help="Number of patients (split evenly over classes)."),
    size: int = typer.Option(512, help="Rows and columns of every slice."),
    seed: int = typer.Option(0, help="Random seed (the cohort is deterministic per seed)."),
    min_slices: int = typer.Option(60, help="Fewest slices of a study."),
    max_slices: int = typer.Option(200, help="Most slices of a study."),
) -> None:
    """Write a synthetic cohort (DICOM CT series + cohort.csv + slice_labels.csv)."""
    from msnet.data.synthetic import synth_cohort

    path = synth_cohort(out, n_patients=patients, size=size, seed=seed, slices=(min_slices, max_slices))
    typer.echo(f"wrote {path}")
