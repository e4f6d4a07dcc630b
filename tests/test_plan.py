"""trainer.plan (what a run states before it starts) and the LR scaling of trainer.config."""

from __future__ import annotations

import argparse
import dataclasses
import tarfile
from pathlib import Path

import pytest

from models import build_encoder
from pipelines.spec import SPEC_PRESETS
from trainer import TrainConfig, add_config_args, config_from_args, run
from trainer.config import PRESETS, resumed_config
from trainer.plan import build_plan, count_parameters, describe_source, format_plan


def resolve(*argv, world_size: int = 1) -> TrainConfig:
    return config_from_args(add_config_args(argparse.ArgumentParser()).parse_args(list(argv)), world_size=world_size)


@pytest.fixture(scope="module")
def small_folder(imagenette, tmp_path_factory) -> Path:
    """3 imagenette classes x 12 images (symlinks)."""
    root = tmp_path_factory.mktemp("plan_src")
    for wnid in sorted(p.name for p in (imagenette / "train").iterdir())[:3]:
        (root / wnid).mkdir()
        for f in sorted((imagenette / "train" / wnid).iterdir())[:12]:
            (root / wnid / f.name).symlink_to(f)
    return root


# ------------------------------------------------------------------------------------------ LR scaling
def test_preset_lr_scales_linearly_with_the_global_batch_and_an_explicit_lr_does_not():
    seed = PRESETS["seed"]
    for world, batch, accum in ((8, 64, 1), (32, 64, 1), (4, 32, 2), (1, 64, 1)):
        cfg = resolve("--preset", "seed", "--batch-size", str(batch), "--accum-steps", str(accum), world_size=world)
        # linear rule, written out: the preset's LR is right for its reference global batch
        assert cfg.lr == pytest.approx(seed["lr"] * batch * world * accum / seed["base_batch"])
        assert (cfg.base_lr, cfg.base_batch) == (seed["lr"], seed["base_batch"])
    assert resolve("--preset", "seed", world_size=8).lr == pytest.approx(5e-4)  # the seed: 64 x 8 GPUs at 5e-4
    assert resolve("--preset", "seed", world_size=32).lr == pytest.approx(2e-3)  # 4 nodes x 8 GPUs: 4x the batch
    for world in (1, 32):
        explicit = resolve("--preset", "seed", "--lr", "1e-4", world_size=world)
        assert (explicit.lr, explicit.base_lr, explicit.base_batch) == (1e-4, 1e-4, None)
    direct = TrainConfig(lr=3e-4)  # the API: an LR set directly is its own base, never rescaled
    assert (direct.base_lr, direct.base_batch) == (3e-4, None)


def test_resume_on_another_world_size_is_allowed_and_keeps_the_launch_lr(tmp_path, small_folder):
    """A run launched for world size 1 and relaunched for world size 2 (here in one process: the resume
    check and the LR are what is tested, not DDP) resumes; a different base LR is refused."""
    from trainer.train import find_resume_checkpoint  # the trainer's own resume check

    spec = SPEC_PRESETS["cpu-small"].replace(global_size=32, local_size=16, local_views=2)
    args = ["--preset", "cpu-small", "--arch", "vit_t", "--batch-size", "8", "--proj-dim", "32", "--hidden-dim",
            "64", "--num-slices", "32", "--data", str(small_folder), "--out", str(tmp_path / "run"),
            "--num-workers", "0", "--backend", "torchvision", "--image-every", "0", "--no-amp"]
    first = dataclasses.replace(resolve(*args, "--steps", "1", world_size=1), spec=spec)
    assert first.lr == pytest.approx(2e-3 * 8 / 64)
    assert run(first)["status"] == "done"
    again = dataclasses.replace(resolve(*args, "--steps", "2", world_size=2), spec=spec)
    assert again.lr == pytest.approx(2 * first.lr)
    ckpt = find_resume_checkpoint(again)  # not refused: same recipe (base_lr at base_batch)
    assert ckpt is not None and ckpt["config"]["lr"] == first.lr
    assert resumed_config(again, ckpt["config"]).lr == first.lr  # the run keeps the LR it was launched with
    other = dataclasses.replace(again, base_lr=1e-3)
    with pytest.raises(ValueError, match=r"base_lr=0\.002 but this run has base_lr=0\.001"):
        find_resume_checkpoint(other)
    plan = build_plan(again, world_size=1, device="cpu")  # the plan says the LR was resolved elsewhere
    assert "resolved at launch for a global batch of 16" in plan["lr"]["note"]
    assert plan["resume"].startswith("from checkpoint_000001.pt")


# ------------------------------------------------------------------------------------------ the pieces
@pytest.mark.parametrize("arch, patch", [("vit_t", 8), ("resnet18", None)])
def test_parameter_count_on_the_meta_device_equals_a_real_build(arch, patch):
    cfg = TrainConfig(arch=arch, patch_size=patch, proj_dim=32, hidden_dim=64,
                      spec=SPEC_PRESETS["cpu-small"])
    counted = count_parameters(cfg)
    real = build_encoder(arch, proj_dim=32, hidden_dim=64, patch_size=patch, img_size=64)
    assert counted["backbone"] == sum(p.numel() for p in real.backbone.parameters())
    assert counted["total"] == sum(p.numel() for p in real.parameters())
    assert counted["patch_size"] == patch


def test_vit_l_count_matches_the_papers_304m():
    backbone = count_parameters(TrainConfig(arch="vit_l"))["backbone"]  # no memory: meta device
    assert abs(backbone - 304e6) / 304e6 < 0.01  # LeJEPA's table: ViT-L 304M


def test_source_descriptions(tmp_path, small_folder):
    files = sorted(small_folder.glob("*/*.jpg"))
    folder = describe_source(str(small_folder))
    assert (folder["kind"], folder["samples"], folder["classes"]) == ("ImageFolder", len(files), 3)
    for s in range(3):
        with tarfile.open(tmp_path / f"train-{s:02d}.tar", "w") as tf:
            for f in files[s::3]:
                tf.add(f, arcname=f"{f.stem}.jpg")
    for pattern in (str(tmp_path / "train-{00..02}.tar"), str(tmp_path)):
        shards = describe_source(pattern)
        assert (shards["kind"], shards["shards"], shards["samples"]) == ("webdataset tar shards", 3, None)
    missing = describe_source("/cluster/only/imagenet/train")
    assert missing["samples"] is None and "not visible from" in missing["note"]
    assert "ImageFolder or tar shards" in missing["kind"]
    embedded = describe_source(None)
    assert (embedded["samples"], embedded["classes"]) == (5000, 10)  # 500 train images per class (README)
    with pytest.raises(ValueError, match="no class sub-folders"):
        (tmp_path / "flat").mkdir()
        (tmp_path / "flat" / "a.jpg").symlink_to(files[0])
        describe_source(str(tmp_path / "flat"))


@pytest.mark.ffcv
def test_beton_description_reads_its_header(tmp_path, small_folder):
    from pipelines.convert_ffcv import convert

    beton = tmp_path / "small.beton"
    convert(str(small_folder), beton, max_resolution=64, num_workers=1)
    info = describe_source(str(beton))
    assert (info["kind"], info["samples"], info["classes"]) == ("FFCV .beton", 36, 3)


def test_plan_length_warmup_and_text(small_folder):
    cfg = resolve("--preset", "cpu-small", "--data", str(small_folder), "--batch-size", "4", "--epochs", "3",
                  world_size=2)
    plan = build_plan(cfg, world_size=2, device="cpu", threads_per_rank=1)
    per_epoch = 36 // (4 * 2)  # drop_last: full global batches only
    assert (plan["steps_per_epoch"], plan["steps"], plan["warmup_steps"]) == (per_epoch, 3 * per_epoch,
                                                                             max(1, 3 * per_epoch // 10))
    assert plan["batch"] == {"per_rank": 4, "world_size": 2, "accum_steps": 1, "global": 8}
    assert plan["lr"]["peak"] == pytest.approx(2e-3 * 8 / 64) and plan["lr"]["rule"] == "linear"
    assert plan["backend"].startswith("auto -> ")
    text = format_plan(plan)
    for piece in ("plan: preset cpu-small", "resnet18", "2 global x 64 px (scale 0.3-1)",
                  "6 local x 32 px (scale 0.05-0.3)", f"{3 * per_epoch} steps = 3 epochs of {per_epoch} steps",
                  "ImageFolder, 36 images, 3 classes", "world size 2, 1 CPU thread(s) per rank"):
        assert piece in text, piece
    from_loader = build_plan(cfg, world_size=2, device="cpu", steps_per_epoch=5)  # the trainer knows it exactly
    assert (from_loader["steps_per_epoch"], from_loader["steps"]) == (5, 15)
    by_steps = build_plan(dataclasses.replace(cfg, epochs=None, steps=8), world_size=2, device="cpu")
    assert by_steps["epochs"] == pytest.approx(8 / per_epoch, abs=0.01)
    too_big = build_plan(dataclasses.replace(cfg, batch_size=64), world_size=2, device="cpu")
    assert too_big["steps_per_epoch"] == 0 and "fewer images than one global batch" in format_plan(too_big)
