"""Fine-tuning modes (linear probe, LP-FT, full), source-grouped folds and the image augmentations,
on tiny synthetic slice images (UCSD layout)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from msnet.config import load_config
from msnet.data.cohorts import group_by_paper, image_groups, index_dataset, read_slice_manifest
from msnet.errors import MsnetError
from msnet.data import augment as A
from msnet.data import slices as S
from msnet.stages import finetune as F
from msnet.stages import slice_model as M
from msnet.stages.calibration import OOF_FILE


def _write_images(root: Path, seed: int = 0) -> None:
    """Bright-blob "COVID" images vs dark ones; names follow the dataset's grouping patterns."""
    rng = np.random.default_rng(seed)
    names = {
        "CT_COVID": [f"paper{k}-p{j}.png" for k in range(6) for j in range(2)],
        "CT_NonCOVID": [f"{k}%{j}.jpg" for k in range(3) for j in range(2)] + [f"{n}.png" for n in (10, 11, 20, 21, 30, 40)],
    }
    for split in ("train", "val"):
        for cls, files in names.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for name in files if split == "train" else files[:4]:
                img = rng.integers(0, 80, (40, 40)).astype(np.uint8)
                if cls == "CT_COVID":
                    img[10:30, 10:30] += 120
                Image.fromarray(img).save(folder / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    meta = root / "meta"
    meta.mkdir()
    with open(meta / "MetaInfo.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["File name", "Patient ID", "Age"])
        for k in range(6):
            for j in range(2):
                w.writerow([f"paper{k}-p{j}.png", f"Patient {k // 2}", ""])  # two papers per patient


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ucsd") / "data"
    _write_images(root)
    index_dataset(root, root.parent / "index")
    return root


def _config(folder: Path, images: Path, **finetune) -> object:
    data = yaml.safe_load((Path(F.__file__).parents[1] / "configs" / "tiny.yaml").read_text())
    data["run_dir"] = str(folder / "run")
    data["data"] = {"slice_manifest": str(images.parent / "index" / "slices.csv"), "cohort": "", "slice_labels": "",
                    "classes": ["COVID-19", "NON-COVID"]}
    data["preprocess"] = {"size": 32}
    data["finetune"] = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "folds": 3, **finetune}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_index_groups_images_by_patient_figure_and_numbering_run(images):
    rows = read_slice_manifest(images.parent / "index" / "slices.csv")
    group = {Path(r["image_path"]).name: r["group"] for r in rows if r["subset"] == "train"}
    assert group["paper0-p0.png"] == group["paper1-p1.png"] == "COVID-19/patient:Patient 0"
    assert group["paper2-p0.png"] != group["paper0-p0.png"]
    assert group["0%0.jpg"] == group["0%1.jpg"] != group["1%0.jpg"]
    assert group["10.png"] == group["11.png"] != group["20.png"]
    assert group["30.png"] != group["40.png"]
    assert image_groups(["5.png", "7.png", "6.png"]) == ["run:5"] * 3  # consecutive in any listing order


def test_grouped_folds_never_split_a_group_and_stratify(images):
    rows = [r for r in read_slice_manifest(images.parent / "index" / "slices.csv") if r["subset"] == "train"]
    folds = S.manifest_folds(rows, 3, seed=1)
    assert sorted(str(r["image_path"]) for f in folds for r in f) == sorted(str(r["image_path"]) for r in rows)
    fold_of = defaultdict(set)
    for i, f in enumerate(folds):
        for r in f:
            fold_of[r["group"]].add(i)
    assert all(len(v) == 1 for v in fold_of.values())
    assert all({r["label"] for r in f} == {"COVID-19", "NON-COVID"} for f in folds)
    with pytest.raises(MsnetError):
        S.manifest_folds(rows, 50, seed=1)  # more folds than groups


def test_index_can_group_the_real_ucsd_images_by_paper(shared_data, tmp_path):
    """`msnet index --group-by paper`: every image of a paper (the medRxiv id its name starts with) in
    one group, each patient inside one paper's group, and grouped folds that never split a paper."""
    root = shared_data / "ucsd-covid-ct"
    by_source = index_dataset(root, tmp_path / "source", check=False).rows
    by_paper = index_dataset(root, tmp_path / "paper", check=False, group_by="paper").rows
    assert [r["image_path"] for r in by_source] == [r["image_path"] for r in by_paper]
    covid = [(s, p) for s, p in zip(by_source, by_paper) if s["subset"] == "train" and s["label"] == "COVID-19"]
    doi = {Path(s["image_path"]).name.split("-")[0] for s, _ in covid}  # 2020.02.25.20021568-p23-100.png
    assert all(d.startswith("2020.") for d in doi)  # the train COVID images all come from medRxiv / bioRxiv
    groups_of_doi = defaultdict(set)
    papers_of_patient = defaultdict(set)
    for s, p in covid:
        groups_of_doi[Path(s["image_path"]).name.split("-")[0]].add(p["group"])
        papers_of_patient[s["group"]].add(p["group"])
    assert all(len(g) == 1 for g in groups_of_doi.values())
    assert all(len(g) == 1 for g in papers_of_patient.values())
    assert len({p["group"] for _, p in covid}) == len(doi) < len(papers_of_patient)
    non_covid = [(s["group"], p["group"]) for s, p in zip(by_source, by_paper) if s["label"] == "NON-COVID"]
    assert len(set(non_covid)) == len({s for s, _ in non_covid}) == len({p for _, p in non_covid})  # same partition
    train = [r for r in by_paper if r["subset"] == "train"]
    fold_of = defaultdict(set)
    for i, fold in enumerate(S.manifest_folds(train, 5, seed=0)):
        for r in fold:
            fold_of[Path(r["image_path"]).name.split("-")[0] if r["label"] == "COVID-19" else r["group"]].add(i)
    assert all(len(v) == 1 for v in fold_of.values())
    # a manifest written with source groups, regrouped when read (as benchmarks/ucsd_probe_variants.py does)
    regrouped = group_by_paper(read_slice_manifest(tmp_path / "source" / "slices.csv"))
    written = read_slice_manifest(tmp_path / "paper" / "slices.csv")
    assert [r["group"] for r in regrouped] == [r["group"] for r in written]
    assert sum(a["group"] != b["group"] for a, b in zip(regrouped, by_source)) > 100
    with pytest.raises(MsnetError, match="group-by"):
        index_dataset(root, tmp_path / "bad", check=False, group_by="figure")
    with pytest.raises(MsnetError, match="group-by paper applies to slice images"):
        index_dataset(shared_data / "covid-ct-md", tmp_path / "ctmd", check=False, group_by="paper")


def test_linear_probe_fits_the_head_only(images, tmp_path):
    cfg = _config(tmp_path, images, mode="linear_probe")
    data = S.build_slice_sets(cfg)["train"]
    torch.manual_seed(0)
    model = M.model_for(cfg, 2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.fc.weight.detach().clone()
    M.fit_linear_probe(model, data, cfg.finetune, torch.device("cpu"))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.fc.weight)
    probs = M.predict_slices(model, data, torch.device("cpu"), cfg.finetune.tta)
    assert (probs.argmax(1) == data.labels.numpy()).mean() >= 0.9  # separable toy classes


def test_linear_probe_mode_leaves_the_saved_backbone_as_loaded(images, tmp_path):
    cfg = _config(tmp_path, images, mode="linear_probe")
    torch.manual_seed(0)
    reference = M.model_for(cfg, 2).backbone.state_dict()
    F.finetune(cfg)  # seeds the same way before building the model
    model = M.load_slice_classifier(cfg.run_path / "finetune" / "backbone.pt")
    saved = model.backbone.state_dict()
    assert all(torch.allclose(reference[k].float(), saved[k].float()) for k in reference)
    history = list(csv.DictReader(open(cfg.run_path / "finetune" / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [0]


def test_probe_on_stage_statistics_is_saved_and_served_as_trained(images, tmp_path):
    from msnet.stages.extract import load_encoder

    cfg = _config(tmp_path, images, mode="linear_probe", probe_scale="feature", probe_c=0.01)
    cfg.backbone.pool_stages = [4, 5]
    F.finetune(cfg)
    model = M.load_slice_classifier(cfg.run_path / "finetune" / "backbone.pt")
    assert model.backbone.pool_stages == (4, 5) and model.fc.in_features == 2 * (80 + 112)
    data = S.build_slice_sets(cfg)["train"]
    assert (M.predict_slices(model, data, torch.device("cpu"), cfg.finetune.tta).argmax(1) == data.labels.numpy()).mean() >= 0.9
    encoder = load_encoder(cfg)  # stage 2 encodes with the same cut network
    assert encoder.backbone.pool_stages == (4, 5) and encoder.num_features == model.fc.in_features


def test_probe_refit_uses_the_selection_images_too_and_keeps_the_temperature(images, tmp_path):
    from msnet.inference.bundle import checkpoint_info

    runs = {}
    for refit in (False, True):
        (tmp_path / str(refit)).mkdir()
        cfg = _config(tmp_path / str(refit), images, mode="linear_probe", probe_refit=refit)
        runs[refit] = (cfg, F.finetune(cfg))
    (cfg0, m0), (cfg1, m1) = runs[False], runs[True]
    a = M.load_slice_classifier(cfg0.run_path / "finetune" / "backbone.pt")
    b = M.load_slice_classifier(cfg1.run_path / "finetune" / "backbone.pt")
    assert m1["probe_refit_on"] == m1["n_train"] + m1["n_val"] == checkpoint_info(cfg1.run_path / "finetune" / "backbone.pt")["refit_on"]
    assert a.temperature == b.temperature == m0["temperature"] == m1["temperature"]
    assert not torch.allclose(a.fc.weight, b.fc.weight)  # fitted on more images
    every = S.build_slice_sets(cfg1)
    data = S.SliceSet(torch.cat([every["train"].images, every["val"].images]), torch.cat([every["train"].labels, every["val"].labels]))
    torch.manual_seed(0)
    ref = M.model_for(cfg1, 2)
    M.fit_linear_probe(ref, data, cfg1.finetune, torch.device("cpu"))
    torch.testing.assert_close(b.fc.weight, ref.fc.weight)
    (tmp_path / "full").mkdir()
    full = _config(tmp_path / "full", images, mode="full", epochs=1, probe_refit=True)
    with pytest.raises(MsnetError, match="probe_refit"):
        F.finetune(full)


def test_lp_ft_starts_the_full_phase_from_the_probe_head(images, tmp_path):
    cfg = _config(tmp_path, images, mode="lp_ft", backbone_lr_scale=0.1)
    data = S.build_slice_sets(cfg)["train"]
    torch.manual_seed(0)
    probe = M.model_for(cfg, 2)
    M.fit_linear_probe(probe, data, cfg.finetune, torch.device("cpu"))
    torch.manual_seed(0)
    tr = F._engine(cfg, data, tmp_path, ["a", "b"], 0, 1)
    # the same probe (the trainer's model runs channels last: its features differ in the 6th digit)
    torch.testing.assert_close(tr.model.fc.weight, probe.fc.weight, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(tr.model.fc.bias, probe.fc.bias, atol=1e-4, rtol=1e-3)
    assert [g["lr"] for g in tr.opt.param_groups] == pytest.approx([1e-3, 1e-4])
    (tmp_path / "full").mkdir()
    full_cfg = _config(tmp_path / "full", images, mode="full")
    torch.manual_seed(0)
    full = F._engine(full_cfg, data, tmp_path / "full", ["a", "b"], 0, 1)
    assert not torch.allclose(full.model.fc.weight, probe.fc.weight)


def test_lp_ft_run_records_the_probe_as_epoch_zero(images, tmp_path):
    cfg = _config(tmp_path, images, mode="lp_ft", epochs=1, freeze_bn=True, ema=0.9)
    result = F.finetune(cfg)
    history = list(csv.DictReader(open(cfg.run_path / "finetune" / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [0, 1]
    assert history[0]["train_loss"] == "" and float(history[1]["train_loss"]) > 0  # the probe trained nothing
    assert result["best_epoch"] in (0, 1) and result["n_train"] + result["n_val"] == 24


def test_unknown_mode_is_refused(images, tmp_path):
    with pytest.raises(MsnetError, match="finetune.mode") as err:  # when the config is built, before stage 1
        _config(tmp_path, images, mode="probe")
    assert "'linear_probe'" in str(err.value)


def test_image_augmentation_keeps_shape_and_is_seeded(images, tmp_path):
    cfg = _config(tmp_path, images, crop_scale=0.5, rotate=10, downscale=0.5, jpeg_quality=[20, 40], jpeg_prob=1.0)
    batch = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    a = A.augment_images(batch, cfg.finetune, torch.Generator().manual_seed(3))
    b = A.augment_images(batch, cfg.finetune, torch.Generator().manual_seed(3))
    assert a.shape == batch.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, batch)
    off = _config(tmp_path, images)
    assert A.augment_images(batch, off.finetune, torch.Generator().manual_seed(3)) is batch
    bad = _config(tmp_path, images, jpeg_quality=[50], jpeg_prob=1.0)
    with pytest.raises(MsnetError, match="jpeg_quality"):
        A.augment_images(batch, bad.finetune, torch.Generator().manual_seed(3))


def test_cross_validation_scores_every_train_image_once(images, tmp_path):
    cfg = _config(tmp_path, images, mode="linear_probe", folds=3)
    result = F.cross_validate(cfg)
    assert result["k"] == 3 and len(result["folds"]) == 3
    assert sum(f["n"] for f in result["folds"]) == 24  # train only; val never enters
    assert 0.0 <= result["accuracy"]["mean"] <= 1.0 and result["accuracy"]["sd"] >= 0.0
    saved = json.loads((cfg.run_path / "finetune" / "cv" / "cv_metrics.json").read_text())
    assert saved["accuracy"] == result["accuracy"]


def test_shipped_ucsd_config_loads_beside_an_index_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ucsd").mkdir()  # `msnet index ... -o ucsd` makes this folder
    cfg = load_config("ucsd")
    assert cfg.data.slice_manifest == "ucsd/slices.csv"
    assert cfg.resolve(cfg.data.slice_manifest) == tmp_path / "ucsd" / "slices.csv"
    assert cfg.finetune.mode in M.MODES and cfg.finetune.folds >= 2


def _textured(size: int, seed: int = 0) -> Image.Image:
    """A smooth picture with fine texture on it, at ``size`` px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    smooth = 120 + 80 * np.sin(3 * xx) * np.cos(2 * yy)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 40, (size, size)), 0, 255).astype(np.uint8))


def test_base_size_gives_every_source_resolution_the_same_detail(tmp_path):
    sharp = _textured(256)
    sharp.save(tmp_path / "sharp.png")
    sharp.resize((64, 64), Image.BILINEAR).save(tmp_path / "small.png")  # the same picture, less detail

    def gap(base: int) -> float:
        a = S.load_image_slice(tmp_path / "sharp.png", 128, base_size=base).float()
        b = S.load_image_slice(tmp_path / "small.png", 128, base_size=base).float()
        return float((a - b).abs().mean())

    assert gap(48) < 0.5 * gap(0)  # without it, sharpness alone tells the two sources apart
    # the served path (the spec stored with the weights) does the same
    from msnet.preprocess import PreprocessSpec

    grey = [np.asarray(Image.open(tmp_path / n), dtype=np.float32)[None] for n in ("sharp.png", "small.png")]
    for base, expect_close in ((0, False), (48, True)):
        spec = PreprocessSpec(kind="grey", size=128, base_size=base)
        d = float((spec.unit(grey[0], "grey") - spec.unit(grey[1], "grey")).abs().mean() * 255)
        assert (d < 0.5 * gap(0)) == expect_close
    assert PreprocessSpec.from_dict(PreprocessSpec(base_size=48).to_dict()).base_size == 48
    old = PreprocessSpec().to_dict()
    del old["base_size"]  # a checkpoint written before base_size existed
    assert PreprocessSpec.from_dict(old).base_size == 0


def _random_slices(n: int = 6, size: int = 32) -> S.SliceSet:
    g = torch.Generator().manual_seed(0)
    return S.SliceSet(torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8),
                      torch.tensor([0, 1] * (n // 2)), [f"g{i}" for i in range(n)], ["PNG"] * n)


def test_test_time_augmentation_makes_answers_mirror_invariant(images, tmp_path):
    torch.manual_seed(0)
    model = M.model_for(_config(tmp_path, images), 2, pretrained=False)
    data = _random_slices()
    mirrored = S.SliceSet(data.images.flip(-1), data.labels, data.groups, data.formats)
    for tta in (False, True):
        cfg = _config(tmp_path, images, tta=tta)
        a = M.predict_slices(model, data, torch.device("cpu"), cfg.finetune.tta)
        b = M.predict_slices(model, mirrored, torch.device("cpu"), cfg.finetune.tta)
        assert np.allclose(a, b, atol=1e-5) == tta
        assert np.allclose(a.sum(1), 1.0, atol=1e-5)


class _SharpnessReader(torch.nn.Module):
    """A 'classifier' that answers from how sharp an image is (a file shortcut, not a diagnosis)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.data_config = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
        self.threshold = threshold

    def forward(self, x):
        sharp = (x[:, 0, :, 1:] - x[:, 0, :, :-1]).abs().mean(dim=(1, 2))
        return torch.stack([(sharp - self.threshold) * 50, (self.threshold - sharp) * 50], dim=1)


class _BrightnessReader(_SharpnessReader):
    def forward(self, x):
        m = x[:, 0].mean(dim=(1, 2))
        return torch.stack([(m - self.threshold) * 50, (self.threshold - m) * 50], dim=1)


def test_shortcut_probes_catch_a_model_that_reads_sharpness(images, tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    rows = []
    for i in range(6):
        _textured(128, seed=i).save(folder / f"{i}.png")
        rows.append({"image_path": str(folder / f"{i}.png"), "label": "COVID-19", "format": "PNG"})
    cfg = _config(tmp_path, images)
    cfg.preprocess.size = 128
    data = S.image_slices(rows, ["COVID-19", "NON-COVID"], "probe", cfg.preprocess, cfg.data.reencode_jpeg)
    x = data.images.float() / 255
    sharp = float((x[:, 0, :, 1:] - x[:, 0, :, :-1]).abs().mean())
    bright = float(x.mean())
    flips = {}
    for name, model in (("sharpness", _SharpnessReader(sharp * 0.8)), ("brightness", _BrightnessReader(bright * 0.5))):
        probs = M.calibrated_probs(model, data, torch.device("cpu"), cfg.finetune.tta, temperature=1.0)
        assert (probs.argmax(1) == 0).all()  # both call every original image COVID-19
        flips[name] = M.shortcut_flips(model, rows, probs, ["COVID-19", "NON-COVID"], torch.device("cpu"), cfg.preprocess,
                                     cfg.data.reencode_jpeg, cfg.finetune.tta)
    assert flips["sharpness"]["half"]["flip_rate"] == 1.0  # halving the resolution changes its answer
    assert flips["brightness"]["half"]["flip_rate"] == 0.0 and flips["brightness"]["jpeg"]["flip_rate"] == 0.0
    assert flips["brightness"]["jpeg"]["n"] == 6 and "flip_rate_png" in flips["brightness"]["jpeg"]


def test_fold_ensemble_test_with_reliability_diagram(images, tmp_path):
    cfg = _config(tmp_path, images, mode="linear_probe", folds=3, tta=True)
    with pytest.raises(MsnetError, match="fold models"):
        F.finetune(cfg)
        cfg.finetune.ensemble = True
        F.test(cfg, images / "val")
    F.cross_validate(cfg)
    cfg.finetune.ensemble = False
    single = F.test(cfg, images / "val")
    cfg.finetune.ensemble = True
    both = F.test(cfg, images / "val")
    assert single["models"] == 1 and both["models"] == 4 and len(both["single_model_accuracy"]) == 4
    assert both["tta"] and {"ece", "brier"} <= set(both) and {"jpeg", "half"} <= set(both["shortcut"])
    assert (cfg.run_path / "finetune" / "test" / "val" / "reliability.png").stat().st_size > 1000
    # another test set named `val` gets a folder of its own: the first results stay
    import shutil

    other = shutil.copytree(images / "val", tmp_path / "elsewhere" / "val")
    F.test(cfg, other)
    folders = sorted((cfg.run_path / "finetune" / "test").iterdir())
    assert len(folders) == 2 and folders[0].name == "val" and folders[1].name.startswith("val-")
    recorded = [json.loads((f / "metrics.json").read_text())["test_dir"] for f in folders]
    assert recorded == [str((images / "val").resolve()), str(other.resolve())]
    F.test(cfg, images / "val")  # the same set again: the same folder
    assert sorted((cfg.run_path / "finetune" / "test").iterdir()) == folders


def test_temperature_from_the_out_of_fold_predictions(images, tmp_path):
    cfg = _config(tmp_path, images, mode="linear_probe", folds=3, calibration="cv")
    F.finetune(cfg)  # no --cv yet: it is run first, for its out-of-fold predictions
    cv = json.loads((cfg.run_path / "finetune" / "cv" / "cv_metrics.json").read_text())
    with np.load(cfg.run_path / "finetune" / "cv" / OOF_FILE) as f:
        assert f["logits"].shape == (24, 2) and sorted(f["labels"].tolist()) == [0] * 12 + [1] * 12
    model = M.load_slice_classifier(cfg.run_path / "finetune" / "backbone.pt")
    assert model.temperature == pytest.approx(cv["oof_temperature"])
    assert cv["oof_temperature"] != pytest.approx(F.cross_validate(cfg)["folds"][0]["temperature"])
    cfg.finetune.calibration = "nonsense"
    with pytest.raises(MsnetError, match="calibration"):
        F.finetune(cfg, overwrite=True)
