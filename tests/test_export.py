"""models/export.py: a tiny trained checkpoint (ViT-tiny/8 and ResNet-18, real trainer runs on imagenette160)
exported, loaded back by timm alone (the model card's call, strictly), its config.json read by timm's hub
reader, and evaluation reading the export with the run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.models._hub import load_model_config_from_path, load_state_dict_from_path

from evaluation import knn, kshot, visualize
from evaluation.features import from_checkpoint
from models import encoder_from_checkpoint, load_checkpoint
from models.export import export, load_export, main as export_main
from test_trainer import TINY  # the trainer tests' 2-core config: 2x32 + 2x16 px views, narrow projector
from trainer import TrainConfig, run

ARCHS = {"vit_t": dict(arch="vit_t", patch_size=8), "resnet18": dict(arch="resnet18", patch_size=None)}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def runs(imagenette, tmp_path_factory) -> dict[str, Path]:
    """Two real runs of 3 steps (checkpoint at step 3), one per architecture family."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, arch in ARCHS.items():
        cfg = TrainConfig(**dict(TINY, **arch, data=str(imagenette / "train"), out=str(root / name), steps=3,
                                 ckpt_every=3))
        assert run(cfg)["status"] == "done"
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def small_folder(imagenette, tmp_path_factory) -> Path:
    """imagefolder:ROOT with 3 imagenette classes, 10 train + 6 val images each (symlinks to the real JPEGs)."""
    root = tmp_path_factory.mktemp("small")
    for cls in sorted((imagenette / "train").iterdir())[:3]:
        for split, n in (("train", 10), ("val", 6)):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted((imagenette / split / cls.name).iterdir())[:n]:
                (root / split / cls.name / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_loads_strictly_in_timm_and_equals_the_backbone(runs, tmp_path, arch):
    out = export(runs[arch], tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    weights = out / "model.safetensors"
    # exactly the call the model card documents, with nothing from this project
    model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(weights)), **cfg["model_args"]).eval()
    saved = safetensors.torch.load_file(weights)
    # strict: timm relaxes strictness when num_classes differs from its default card, so check it here
    assert set(saved) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    encoder, _ = encoder_from_checkpoint(runs[arch])
    assert all(torch.equal(encoder.backbone.state_dict()[k], v) for k, v in saved.items())
    hub = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # the hub route (config.json)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = encoder.backbone(x)
        assert torch.equal(model(x), expected) and torch.equal(hub(x), expected)
        if arch == "vit_t":  # dynamic size: the 16-px local views too
            assert torch.equal(model(x[..., :16, :16]), encoder.backbone(x[..., :16, :16]))


def test_config_json_round_trips_through_timm_hub_reader(runs, tmp_path):
    out = export(runs["vit_t"], tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    pretrained_cfg, name, model_args = load_model_config_from_path(out)
    assert name == written["architecture"] == "vit_tiny_patch16_224"
    assert model_args == written["model_args"] == {"patch_size": 8, "dynamic_img_size": True,
                                                   "dynamic_img_pad": True, "img_size": 32}
    assert {k: pretrained_cfg[k] for k in written["pretrained_cfg"]} == written["pretrained_cfg"]
    assert sorted(load_state_dict_from_path(out)) == sorted(safetensors.torch.load_file(out / "model.safetensors"))
    spec = load_checkpoint(runs["vit_t"])["config"]["spec"]
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model(f"local-dir:{out}", pretrained=True))
    assert tuple(data_cfg["input_size"]) == (3, 32, 32) and data_cfg["interpolation"] == "bilinear"
    assert tuple(data_cfg["mean"]) == tuple(spec["mean"]) and tuple(data_cfg["std"]) == tuple(spec["std"])
    assert data_cfg["crop_pct"] == 0.875
    meta = written["lejepa"]
    assert (meta["arch"], meta["patch_size"], meta["step"]) == ("vit_t", 8, 3)
    backbone, cfg = load_export(out)
    assert cfg == written and not backbone.training


def test_model_card_has_the_recipe_the_load_call_and_the_kshot_table(runs, small_folder, tmp_path):
    run_dir = runs["vit_t"]
    kshot.main(["--checkpoint", str(run_dir), "--datasets", f"imagefolder:{small_folder}", "--shots", "all",
                "--num-workers", "0", "--cache-dir", "", "--markdown", str(run_dir / "kshot.md")])
    try:
        card = (export(run_dir, tmp_path / "export") / "README.md").read_text()
    finally:
        (run_dir / "kshot.md").unlink()
    assert card.startswith("---\nlibrary_name: timm\n")
    for expected in ("# vit_t LeJEPA, step 3", "timm `vit_tiny_patch16_224`", "patch_size=8",
                     "2 × 32 px global", "2 × 16 px local", "| λ (SIGReg weight) | 0.1 (64 slices) |",
                     "| steps | 3 of 3 |", "| batch | 8 per rank × 1 rank(s) × 1 accumulation = 8 |",
                     str(Path(load_checkpoint(run_dir)["config"]["data"])), 'create_model("local-dir:',
                     "pretrained_cfg_overlay=dict(file=\"model.safetensors\")", "## k-shot transfer",
                     "| all | vit_t LeJEPA step 3 |"):
        assert expected in card, expected
    version = load_checkpoint(run_dir)["code_version"]
    assert f"| code version | `{version}` |" in card


def test_evaluation_reads_an_export_with_the_runs_numbers(runs, small_folder, tmp_path, dtd10):
    run_dir = runs["vit_t"]
    out = export(run_dir, tmp_path / "export")
    data = ["--datasets", f"imagefolder:{small_folder}", "--num-workers", "0", "--cache-dir", ""]

    def numbers(rows):
        return [{k: r[k] for k in ("dataset", "model", "shots", "mean", "std", "per_seed", "choices")} for r in rows]

    for script, extra in ((kshot, ["--shots", "2", "all", "--seeds", "2"]), (knn, ["--shots", "all"])):
        from_run = script.main(["--checkpoint", str(run_dir), *data, *extra])
        from_export = script.main(["--checkpoint", str(out), *data, *extra])
        assert numbers(from_export) == numbers(from_run)
        assert from_export[0]["model_info"]["source"] == "export"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for probe in ("seed", "pooled"):
            a, b = from_checkpoint(run_dir, probe=probe), from_checkpoint(out, probe=probe)
            assert a.identity == b.identity  # same weights + recipe: they even share feature-cache entries
            assert torch.equal(a.module.probe_features(x), b.module.probe_features(x))
    pngs = [visualize.main(["--checkpoint", str(src), "--images", str(dtd10 / "test"), "--num-images", "2",
                            "--display-size", "32", "--out", str(tmp_path / f"{i}.png")]) for i, src in enumerate((run_dir, out))]
    assert np.array_equal(*(np.asarray(Image.open(p)) for p in pngs))


def test_bad_input_is_a_clear_error_and_leaves_nothing(runs, tmp_path, capsys):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as exc:
            export_main(list(argv))
        return str(exc.value.code)

    (tmp_path / "empty_run").mkdir()
    assert f"no checkpoint_*.pt files in run dir {tmp_path / 'empty_run'}" in fails(
        "--checkpoint", str(tmp_path / "empty_run"), "--out", str(tmp_path / "a"))
    ckpt_file = sorted(runs["resnet18"].glob("checkpoint_*.pt"))[-1]
    old = torch.load(ckpt_file, weights_only=True)
    old["config"]["arch"] = "resnet9000"
    torch.save(old, tmp_path / "old.pt")
    assert f"checkpoint {tmp_path / 'old.pt'} has unknown arch 'resnet9000'" in fails(
        "--checkpoint", str(tmp_path / "old.pt"), "--out", str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    assert f"--out {tmp_path / 'c'} exists and is not an empty folder" in fails(
        "--checkpoint", str(ckpt_file), "--out", str(tmp_path / "c"))
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
    pickled = tmp_path / "pickled.pt"  # an arbitrary pickled object: refused by weights_only, as on resume
    torch.save(dict(old, extra=Path("x")), pickled)
    assert "weights_only=True) refuses" in fails("--checkpoint", str(pickled), "--out", str(tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "empty_run", "old.pt", "pickled.pt"]  # no partial
    (tmp_path / "e").mkdir()  # an existing empty folder is fine
    assert export_main(["--checkpoint", str(ckpt_file), "--out", str(tmp_path / "e")]) == tmp_path / "e"
    assert "load: timm.create_model('local-dir:" in capsys.readouterr().out


def test_bad_exports_are_clear_errors(runs, tmp_path, small_folder):
    out = export(runs["resnet18"], tmp_path / "export")
    with pytest.raises(ValueError, match="--probe projector: export .* holds the backbone only"):
        from_checkpoint(out, probe="projector")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "lejepa"}))
    with pytest.raises(ValueError, match=r"config.json is not a lejepa-export/1 export"):
        load_export(out)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors does not exist"):
        load_export(out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors does not fit resnet18"):
        load_export(out)
