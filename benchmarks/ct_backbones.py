"""Frozen backbones side by side on a CT cohort with slice labels: leave-one-patient-out infection AUCs.

Every backbone runs the shipped `ct` recipe (`msnet finetune ct --cv`: a logistic regression on frozen
features, infected against clean slices, each patient scored by a probe that never saw it), with only
the backbone changed (`astra_slab16` is the shipped one: 16 slices every 8); the lung-area baseline is
printed beside. Run from a folder holding `cohort/`
(`msnet index DATASET -o cohort`), with one or two threads:

    OMP_NUM_THREADS=2 python benchmarks/ct_backbones.py [--variants astra lite0 ...]
"""

from __future__ import annotations

import argparse
from msnet.config import apply_overrides, load_config
from msnet.stages.ct_eval import cross_validate_cohort

TWO_D = ["backbone.slab=[]"]
VARIANTS = {
    "astra": ["backbone.name=astra", *TWO_D],
    "astra_sum": ["backbone.name=astra_sum", *TWO_D],
    "astra_slab": ["backbone.name=astra_slab", "backbone.slab=[8,8]"],
    "astra_slab16": [],  # the shipped ct config
    "astra_layer4": ["backbone.name=astra", *TWO_D, "backbone.pool_stages=[4]"],
    "lite0": ["backbone.name=efficientnet_lite0", *TWO_D, "backbone.pool_stages=[4,5]", "preprocess.windows=[[-600,1500]]"],
}


LABELS = {
    "astra": "astra: 2-D, centre slices of the kernels",
    "astra_sum": "astra_sum: 2-D, kernels summed over depth",
    "astra_slab": "astra_slab: 3-D, 8 slices every 8",
    "astra_slab16": "**astra_slab: 3-D, 16 slices every 8 (shipped `ct`)**",
    "astra_layer4": "astra: 2-D, layer4 average instead",
    "lite0": "efficientnet_lite0 (ImageNet), blocks 3-4",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    rows = []
    for name in args.variants:
        cfg = apply_overrides(load_config("ct"), VARIANTS[name] + [f"run_dir=runs/ct-bench-{name}"])
        rows.append((name, cross_validate_cohort(cfg)))
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print("| features | within patients | vs normal patient | COVID within | CAP within | lung slices: within | "
          "lung slices: vs normal |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rows:
        a, lung = m["all_slices"], m["lung_slices"]
        print(f"| {LABELS[name]} ({m['n_features']}) | {f(a['auc_within_patients'])} | {f(a['auc_vs_normal'])} | "
              f"{f(a['per_class'].get('COVID-19', {}).get('auc_within_patients'))} | "
              f"{f(a['per_class'].get('CAP', {}).get('auc_within_patients'))} | {f(lung['auc_within_patients'])} | "
              f"{f(lung['auc_vs_normal'])} |")
    a, lung = rows[0][1]["all_slices"], rows[0][1]["lung_slices"]
    print(f"| lung area of the slice alone (baseline) | {f(a['lung_area_baseline_within_patients'])} | "
          f"{f(a['lung_area_baseline_vs_normal'])} | {f(a['per_class'].get('COVID-19', {}).get('lung_area_baseline'))} | "
          f"{f(a['per_class'].get('CAP', {}).get('lung_area_baseline'))} | {f(lung['lung_area_baseline_within_patients'])} | "
          f"{f(lung['lung_area_baseline_vs_normal'])} |")


if __name__ == "__main__":
    main()
