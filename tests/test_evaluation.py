"""evaluation/: k-shot sampling and probing, kNN, transfer datasets and PCA maps, on real images (dtd10,
imagenette160) and a real checkpoint trained here with the CPU preset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation import cli, knn, kshot, visualize, watch
from evaluation.features import cached_features, from_checkpoint, from_timm, random_init
from evaluation.kshot import holdout_split, sample_shots
from evaluation.transfer_datasets import DatasetError, cap_per_class, load_dataset, parse_dataset_arg
from models import FrozenFeatures, build_encoder

REPO = Path(__file__).resolve().parents[1]
# A ViT-tiny/8 at 32 px (16 patches): the real probe path (CLS of the last two blocks + LayerNorm), cheap.
TINY_VIT = ["--arch", "vit_t", "--random-init", "--patch-size", "8", "--image-size", "32"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def link_tree(files: dict[str, Path], root: Path) -> Path:
    """Symlink {relative path: real image} under root (no copies of the image bytes)."""
    for rel, src in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve())
    return root


@pytest.fixture(scope="session")
def dtd_torchvision_root(dtd10, tmp_path_factory) -> Path:
    """A layout fixture: dtd10's real images arranged the way torchvision.datasets.DTD expects the official
    archive (ROOT/dtd/dtd/images/<class>/<file>, ROOT/dtd/dtd/labels/{train,val,test}1.txt). The first half
    of each class's dtd10 train images form `train1`, the second half `val1`; dtd10 test is `test1`."""
    root = tmp_path_factory.mktemp("dtd_tv")
    data = root / "dtd" / "dtd"
    lists = {"train": [], "val": [], "test": []}
    files = {}
    for cls_dir in sorted((dtd10 / "train").iterdir()):
        train = sorted(cls_dir.iterdir())
        test = sorted((dtd10 / "test" / cls_dir.name).iterdir())
        half = len(train) // 2
        for split, group in (("train", train[:half]), ("val", train[half:]), ("test", test)):
            for f in group:
                lists[split].append(f"{cls_dir.name}/{f.name}")
                files[f"dtd/dtd/images/{cls_dir.name}/{f.name}"] = f
    link_tree(files, root)
    (data / "labels").mkdir(parents=True)
    for split, lines in lists.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def small_folder(dtd10, tmp_path_factory) -> Path:
    """ImageFolder with 3 dtd10 classes, the last one holding only 3 train images (for --shots > class)."""
    root = tmp_path_factory.mktemp("small")
    files = {}
    for i, cls_dir in enumerate(sorted((dtd10 / "train").iterdir())[:3]):
        n_train = 3 if i == 2 else 12
        for f in sorted(cls_dir.iterdir())[:n_train]:
            files[f"train/{cls_dir.name}/{f.name}"] = f
        for f in sorted((dtd10 / "test" / cls_dir.name).iterdir())[:8]:
            files[f"test/{cls_dir.name}/{f.name}"] = f
    return link_tree(files, root)


# ------------------------------------------------------------------------------------------- datasets
def test_torchvision_dtd_loads_the_layout_fixture(dtd_torchvision_root, dtd10):
    train, test = load_dataset(parse_dataset_arg(f"dtd:{dtd_torchvision_root}"))
    classes = sorted(p.name for p in (dtd10 / "train").iterdir())
    assert train.classes == classes and test.classes == classes
    assert len(train.labels) == 800 and len(test.labels) == 400  # train pool = train1 + val1
    assert np.bincount(train.labels).tolist() == [80] * 10 and np.bincount(test.labels).tolist() == [40] * 10
    # torchvision's own file lists: every image sits in its label's class folder, train and test disjoint
    train_files = [f for part in train.dataset.datasets for f in part._image_files]
    for f, label in zip(train_files, train.labels):
        assert f.parent.name == classes[label]
    assert not {f.name for f in train_files} & {f.name for f in test.dataset._image_files}
    image, label = test.dataset[5]
    src = dtd10 / "test" / classes[label] / test.dataset._image_files[5].name
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(src).convert("RGB")))


def test_dataset_errors_name_the_input_and_the_expected_files(tmp_path, dtd_torchvision_root, small_folder):
    with pytest.raises(DatasetError, match=r"dtd:.*missing.*does not exist.*labels/\{train,val,test\}1.txt"):
        load_dataset(parse_dataset_arg(f"dtd:{tmp_path / 'missing'}"))
    broken = tmp_path / "broken"  # images present, label lists missing
    (broken / "dtd" / "dtd").mkdir(parents=True)
    (broken / "dtd" / "dtd" / "images").symlink_to(dtd_torchvision_root / "dtd" / "dtd" / "images")
    with pytest.raises(DatasetError, match=r"torchvision.datasets.DTD.*train1.txt.*It expects ROOT/dtd/dtd/images"):
        load_dataset(parse_dataset_arg(f"dtd:{broken}"))
    (tmp_path / "empty").mkdir()
    for name, expected in (("cifar10", "cifar-10-batches-py"), ("food101", "food-101/meta"),
                           ("oxfordiiitpet", "oxford-iiit-pet/annotations"), ("fgvcaircraft", "fgvc-aircraft-2013b"),
                           ("flowers102", "flowers-102/setid.mat"), ("stanfordcars", "stanford_cars/devkit"),
                           ("cifar100", "cifar-100-python")):
        with pytest.raises(DatasetError, match=re.escape(expected)):
            load_dataset(parse_dataset_arg(f"{name}:{tmp_path / 'empty'}"))
    with pytest.raises(DatasetError, match="unknown name 'imagenet'"):
        parse_dataset_arg(f"imagenet:{tmp_path}")
    with pytest.raises(DatasetError, match="NAME:ROOT"):
        parse_dataset_arg("dtd")
    with pytest.raises(DatasetError, match=r"no folder .*train"):
        load_dataset(parse_dataset_arg(f"imagefolder:{tmp_path / 'empty'}"))
    one = link_tree({f"{s}/banded/{f.name}": f for s in ("train", "test")
                     for f in sorted((small_folder / "train").iterdir())[0].iterdir()}, tmp_path / "one")
    with pytest.raises(DatasetError, match=r"1 class\(es\).*at least 2"):
        load_dataset(parse_dataset_arg(f"imagefolder:{one}"))


def test_imagefolder_uses_val_when_there_is_no_test(dtd10, tmp_path):
    root = tmp_path / "tv"
    (root).mkdir()
    (root / "train").symlink_to(dtd10 / "train")
    (root / "val").symlink_to(dtd10 / "test")
    train, test = load_dataset(parse_dataset_arg(f"imagefolder:{root}"))
    assert len(train.labels) == 800 and len(test.labels) == 400


# ------------------------------------------------------------------------------------------- sampling
def test_kshot_sampling_is_exact_seeded_and_never_touches_test(dtd_torchvision_root):
    train, test = load_dataset(parse_dataset_arg(f"dtd:{dtd_torchvision_root}"))
    train_files = [f for part in train.dataset.datasets for f in part._image_files]
    test_files = set(test.dataset._image_files)
    for k in (1, 10):
        picks = {seed: sample_shots(train.labels, k, seed)[0] for seed in range(4)}
        for seed, idx in picks.items():
            assert np.bincount(train.labels[idx]).tolist() == [k] * 10  # exactly k per class
            assert len(set(idx.tolist())) == len(idx)  # without replacement
            assert not {train_files[i] for i in idx} & test_files
            assert np.array_equal(idx, sample_shots(train.labels, k, seed)[0])  # same seed, same shots
        assert len({tuple(idx) for idx in picks.values()}) == 4  # seeds differ
    idx, short = sample_shots(train.labels, "all", 0)
    assert np.array_equal(idx, np.arange(800)) and short == {}


def test_kshot_sampling_is_uniform_within_each_class(dtd_torchvision_root):
    """Each of the 80 images of a class is picked with probability k/80: counts over 400 seeds are
    Binomial(400, 1/8) (mean 50, sd 6.6); 6 sd bounds make a false failure over 800 images negligible."""
    train, _ = load_dataset(parse_dataset_arg(f"dtd:{dtd_torchvision_root}"))
    counts = np.zeros(len(train.labels))
    for seed in range(400):
        counts[sample_shots(train.labels, 10, seed)[0]] += 1
    sd = np.sqrt(400 * (1 / 8) * (7 / 8))
    assert np.abs(counts - 50).max() < 6 * sd


def test_holdout_split_keeps_every_class_in_the_fit_set():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1 + [3] * 2)
    fit, val = holdout_split(labels, seed=3)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 1, 0, 1]
    assert set(labels[fit].tolist()) == {0, 1, 2, 3}
    assert np.array_equal(fit, holdout_split(labels, seed=3)[0])
    assert not np.array_equal(fit, holdout_split(labels, seed=4)[0])


# ---------------------------------------------------------------------------------------- classifiers
@pytest.fixture(scope="session")
def tiny_features(dtd_torchvision_root, tmp_path_factory):
    """Real features: the tiny random-init ViT on the DTD layout fixture, through the CLI's cache."""
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("out")
    argv = [*TINY_VIT, "--datasets", f"dtd:{dtd_torchvision_root}", "--shots", "1", "10", "all", "--seeds", "3",
            "--num-workers", "1", "--cache-dir", str(cache), "--json", str(out / "a.json"),
            "--markdown", str(out / "a.md")]
    results = kshot.main(argv)
    entries = {p.name.split("-")[1]: torch.load(p, weights_only=True) for p in sorted(cache.glob("*.pt"))}
    return argv, results, entries, out


def test_linear_probe_reaches_the_regularised_optimum(tiny_features):
    """L-BFGS solution: the gradient of mean CE + wd/2 |W|^2 vanishes (a necessary and, for this strictly
    convex objective, sufficient condition)."""
    _, _, entries, _ = tiny_features
    x, y = entries["train"]["features"], entries["train"]["labels"]
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    for wd in (1e-2, 1.0):
        w = kshot.fit_logistic(x, y, 10, wd, max_iter=500).requires_grad_(True)
        x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
        loss = F.cross_entropy(x1 @ w, y) + 0.5 * wd * w[:-1].square().sum()
        (grad,) = torch.autograd.grad(loss, w)
        assert grad.abs().max() < 1e-3  # from ~0.1 at W = 0


def test_knn_matches_a_direct_implementation(tiny_features):
    _, _, entries, _ = tiny_features
    train_x, train_y = entries["train"]["features"], entries["train"]["labels"]
    test_x = entries["test"]["features"]
    pred = knn.knn_classifier(train_x, train_y, test_x, 10, seed=0, chunk=37).predictions  # uneven chunks
    a, b = train_x.double().numpy(), test_x.double().numpy()
    sims = (b / np.linalg.norm(b, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    expected = []
    for row in sims:
        nearest = np.argsort(-row)[:20]
        votes = np.zeros(10)
        np.add.at(votes, train_y.numpy()[nearest], np.exp(row[nearest] / 0.07))
        expected.append(votes.argmax())
    assert (pred.numpy() == np.array(expected)).mean() > 0.99  # float32 vs float64 ties may flip one vote


# ------------------------------------------------------------------------------------------------ CLI
def test_kshot_cli_outputs(tiny_features):
    argv, results, entries, out = tiny_features
    rows = json.loads((out / "a.json").read_text())
    assert [(r["dataset"], r["shots"], r["seeds"]) for r in rows] == [("dtd", 1, 3), ("dtd", 10, 3), ("dtd", "all", 1)]
    for r in rows:
        assert {"dataset", "shots", "mean", "std", "seeds", "model"} <= set(r)
        assert r["model"] == "vit_t random init" and len(r["per_seed"]) == r["seeds"]
        assert r["mean"] == pytest.approx(np.mean(r["per_seed"]))
        assert 0 <= r["mean"] <= 100 and r["n_train"] == 800 and r["n_test"] == 400
    # 10 classes: better than chance (10 %) with all shots; the binomial sd at 400 test images is 1.5 points
    assert rows[2]["mean"] > 10 + 4 * 1.5
    table = (out / "a.md").read_text().splitlines()
    assert table[0] == "| shots | model | dtd | avg |"
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| 1", "| 10", "| all"]
    assert f"{rows[1]['mean']:.1f} ± {rows[1]['std']:.1f}" in table[3]


def test_results_are_deterministic_and_the_cache_is_exact(small_folder, tmp_path):
    """Same seeds -> the same shots and probes; features read from the cache equal a fresh extraction."""
    argv = [*TINY_VIT, "--datasets", f"imagefolder:{small_folder}", "--shots", "1", "2", "all", "--seeds", "3",
            "--num-workers", "0"]
    first = kshot.main([*argv, "--cache-dir", str(tmp_path)])
    assert len(list(tmp_path.glob("*.pt"))) == 2  # train + test entries
    assert kshot.main([*argv, "--cache-dir", str(tmp_path)]) == first  # from the cache
    assert kshot.main([*argv, "--cache-dir", ""]) == first  # fresh extraction, no cache


def test_shots_larger_than_a_class_warn_and_are_recorded(small_folder, tmp_path):
    with pytest.warns(UserWarning, match=r"--shots 5 is larger than 1 class\(es\).*with 3 images"):
        rows = kshot.main([*TINY_VIT, "--datasets", f"imagefolder:{small_folder}", "--shots", "5", "--seeds", "2",
                           "--num-workers", "0", "--cache-dir", str(tmp_path), "--markdown", str(tmp_path / "t.md")])
    short_class = sorted(p.name for p in (small_folder / "train").iterdir())[2]
    assert rows[0]["short_classes"] == {short_class: 3}
    assert "used all of them" in (tmp_path / "t.md").read_text()


def test_knn_cli_and_test_cap(small_folder, tmp_path):
    rows = knn.main([*TINY_VIT, "--datasets", f"imagefolder:{small_folder}", "--shots", "all",
                     "--max-test-per-class", "5", "--num-workers", "0", "--cache-dir", str(tmp_path),
                     "--json", str(tmp_path / "k.json")])
    assert rows[0]["n_test"] == 15 and rows[0]["max_test_per_class"] == 5
    assert rows[0]["choices"][0] == {"k": 20, "temperature": 0.07}
    assert json.loads((tmp_path / "k.json").read_text())[0]["classifier"].startswith("weighted kNN")


def bad_cli(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        kshot.main(list(argv))
    message = str(exc.value.code) if not isinstance(exc.value.code, int) else capsys.readouterr().err
    assert "Traceback" not in message
    return message


def test_cli_bad_input_is_a_clear_error(capsys, tmp_path, small_folder):
    data = ["--datasets", f"imagefolder:{small_folder}", "--shots", "1"]
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert re.search(r"foreign.pt is not a lejepa-ckpt/1 file", bad_cli(capsys, "--checkpoint", str(tmp_path / "foreign.pt"), *data))
    assert "does not exist" in bad_cli(capsys, "--checkpoint", str(tmp_path / "nope"), *data)
    assert "unknown arch 'vit_zz'" in bad_cli(capsys, "--arch", "vit_zz", "--random-init", *data)
    assert "add --random-init" in bad_cli(capsys, "--arch", "vit_t", *data)
    assert "not a timm model name" in bad_cli(capsys, "--timm", "no_such_net", *data)
    assert "expected a positive integer or 'all'" in bad_cli(capsys, *TINY_VIT, *data, "--shots", "0")
    assert "root folder does not exist" in bad_cli(capsys, *TINY_VIT, "--datasets", f"dtd:{tmp_path / 'x'}")


def test_presets_match_the_trainer():
    from pipelines.spec import SPEC_PRESETS
    from trainer.config import PRESETS

    for name, (size, patch) in cli.PRESET_INPUT.items():
        assert size == SPEC_PRESETS[name].global_size and patch == PRESETS[name]["patch_size"]


# ----------------------------------------------------------------------------------------------- timm
def test_timm_models_share_the_encoder_probe(tmp_path):
    """A timm ViT built by timm itself (not through our registry) and given the encoder's weights yields the
    encoder's probe and patch features: one probe function for both."""
    import timm

    torch.manual_seed(0)
    encoder = build_encoder("vit_t", patch_size=8, img_size=32).eval()
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0, patch_size=8, img_size=32,
                            dynamic_img_size=True, dynamic_img_pad=True)
    net.load_state_dict(encoder.backbone.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(FrozenFeatures(net.eval()).probe_features(x), encoder.probe_features(x),
                                   rtol=0, atol=0)
        torch.testing.assert_close(FrozenFeatures(net).patch_features(x), encoder.patch_features(x), rtol=0, atol=0)
    # local weights only: a timm name + a weights file loads those exact weights (no download)
    net = from_timm("resnet18", image_size=32).module.backbone
    torch.save(net.state_dict(), tmp_path / "w.pth")
    for p in net.parameters():
        torch.nn.init.normal_(p)
    torch.save(net.state_dict(), tmp_path / "w2.pth")
    loaded = from_timm("resnet18", weights=tmp_path / "w2.pth", image_size=32)
    assert all(torch.equal(a, b) for a, b in zip(loaded.module.backbone.state_dict().values(), net.state_dict().values()))
    assert loaded.module.probe_features(torch.randn(2, 3, 32, 32)).shape == (2, 512)


# ---------------------------------------------------------------------------------------------- visualize
def test_pca_map_png(dtd10, tmp_path):
    out = visualize.main(["--arch", "vit_t", "--random-init", "--patch-size", "8", "--image-size", "48",
                          "--images", str(dtd10 / "test"), "--num-images", "3", "--display-size", "48",
                          "--out", str(tmp_path / "pca.png")])
    png = np.asarray(Image.open(out))
    assert png.shape == (3 * 52, 2 * 52, 3)  # 3 rows x (input, PCA), 48-px cells + 2-px borders
    # the input column is exactly the centre crop the model saw
    model = random_init("vit_t", 48, 8)
    files = visualize.collect_images([str(dtd10 / "test")], 3)
    assert len({f.parent.name for f in files}) == 3  # spread over classes
    x = model.transform()(Image.open(files[1]).convert("RGB"))
    shown = (x * torch.tensor(model.std)[:, None, None] + torch.tensor(model.mean)[:, None, None]).clamp(0, 1)
    expected = (shown.permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(png[52 + 2:52 + 50, 2:50].astype(float) - expected).max() <= 1
    # the PCA map: 6x6 patches of constant colour, using the full [0, 255] range
    pca = np.stack([png[r * 52 + 2:r * 52 + 50, 54:102] for r in range(3)])  # cells without borders
    # one PCA over all three images: its 1st / 99th percentiles map to 0 / 255
    assert pca.min() == 0 and pca.max() == 255
    assert len(np.unique(png[2:50, 54:102].reshape(-1, 3), axis=0)) <= 36


def test_pca_rgb_follows_the_principal_axes():
    """Patches varying along one known direction: the first colour channel orders them along it."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(-1, 1, 64)
    direction = F.normalize(torch.randn(16, generator=g), dim=0)
    patches = (t[:, None] * 10 * direction + 0.01 * torch.randn(64, 16, generator=g)).reshape(1, 8, 8, 16)
    rgb = visualize.pca_rgb(patches).reshape(64, 3)
    r = rgb[:, 0]
    corr = np.corrcoef(r.numpy(), t.numpy())[0, 1]
    assert abs(corr) > 0.99


# ------------------------------------------------------------------------------ a real pretrained checkpoint
# The CPU preset with small views (ResNet-18 on 2x32 + 2x16 px, batch 32, fp32: with bf16 autocast the
# 16-px views gave non-finite first steps) trained on imagenette160 for about 90 s on 2 cores: long enough
# for LeJEPA to beat random init.
PRETRAIN_FLAGS = ["--preset", "cpu-small", "--arch", "resnet18", "--global-size", "32", "--local-size", "16",
                  "--local-views", "2", "--batch-size", "32", "--lr", "2e-3", "--backend", "torchvision",
                  "--num-workers", "1", "--image-every", "0", "--log-every", "50", "--no-amp"]
PRETRAIN_STEPS = 200


@pytest.fixture(scope="session")
def trained_run(imagenette, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "launchers" / "local.py"), *PRETRAIN_FLAGS, "--data",
                    str(imagenette / "train"), "--steps", str(PRETRAIN_STEPS), "--ckpt-every", str(PRETRAIN_STEPS),
                    "--out", str(out)], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


@pytest.mark.slow
def test_pretrained_checkpoint_beats_random_init(trained_run, dtd_torchvision_root, imagenette, tmp_path):
    """All-shot linear probes against --baseline (the same arch and input size at random init) on DTD
    (transfer) and imagenette val (in-domain), paired on the same 1400 test images (McNemar): the images only
    the pretrained probe gets right must outnumber those only the random-init one gets right by more than 2
    standard deviations of that difference under equal accuracy (one-sided p < 0.025)."""
    data = {"dtd": f"dtd:{dtd_torchvision_root}", "imagenette160": f"imagefolder:{imagenette}"}
    rows = kshot.main(["--checkpoint", str(trained_run), "--baseline", "--datasets", *data.values(), "--shots", "all",
                       "--max-train-per-class", "80", "--num-workers", "1", "--cache-dir", str(tmp_path)])
    models = [f"resnet18 LeJEPA step {PRETRAIN_STEPS}", "resnet18 random init"]
    assert [(r["model"], r["dataset"]) for r in rows] == [(m, d) for m in models for d in data]
    assert {r["model_info"]["image_size"] for r in rows} == {32}
    correct = {m: [] for m in models}
    for label, text in data.items():
        arg = parse_dataset_arg(text)
        train, test = load_dataset(arg)
        train = cap_per_class(train, 80)
        key = {"name": arg.name, "root": str(arg.root.resolve()), "max_train_per_class": 80, "max_test_per_class": None}
        for model in (from_checkpoint(trained_run), random_init("resnet18", 32)):
            x_train, x_test = (cached_features(model, key, name, split, tmp_path)  # cache hits from the CLI run
                               for name, split in (("train", train), ("test", test)))
            pred = kshot.linear_probe(x_train, torch.from_numpy(train.labels), x_test, 10, seed=0).predictions
            correct[model.name].append(pred.numpy() == test.labels)
            (row,) = [r for r in rows if r["model"] == model.name and r["dataset"] == label]
            assert 100 * correct[model.name][-1].mean() == pytest.approx(row["mean"])  # the CLI's numbers
    pretrained, random = (np.concatenate(correct[m]) for m in models)
    only_pretrained, only_random = int((pretrained & ~random).sum()), int((random & ~pretrained).sum())
    assert only_pretrained - only_random > 2 * np.sqrt(only_pretrained + only_random)


def test_bad_checkpoints_are_clear_errors(trained_run, capsys, tmp_path, small_folder):
    data = ["--datasets", f"imagefolder:{small_folder}", "--shots", "1"]
    (ckpt,) = sorted(trained_run.glob("checkpoint_*.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert "truncated or corrupt" in bad_cli(capsys, "--checkpoint", str(truncated), *data)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["arch"] = "vit_zz"
    torch.save(state, tmp_path / "unknown_arch.pt")
    assert "unknown arch 'vit_zz'" in bad_cli(capsys, "--checkpoint", str(tmp_path / "unknown_arch.pt"), *data)
    assert "--baseline needs --checkpoint" in bad_cli(capsys, *TINY_VIT, "--baseline", *data)


def test_pca_map_of_a_checkpoint(trained_run, dtd10, tmp_path):
    out = visualize.main(["--checkpoint", str(trained_run), "--baseline", "--images", str(dtd10 / "test"),
                          "--num-images", "2", "--image-size", "64", "--display-size", "64",
                          "--out", str(tmp_path / "pca.png")])
    png = np.asarray(Image.open(out))
    assert png.shape == (2 * 68, 3 * 68, 3)  # rows: images; columns: input, pretrained, random init
    pretrained, random = png[2:66, 70:134], png[2:66, 138:202]
    assert not np.array_equal(pretrained, random)


# ---------------------------------------------------------------------------------------- watch.py (k-shot during a run)
def eval_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.fixture(scope="module")
def tiny_run(imagenette, tmp_path_factory) -> Path:
    """A real 4-step ViT-tiny/8 run (the trainer tests' config) with a checkpoint at every step."""
    from test_trainer import TINY
    from trainer import TrainConfig, run

    out = tmp_path_factory.mktemp("watch") / "run"
    cfg = TrainConfig(**dict(TINY, data=str(imagenette / "train"), out=str(out), steps=4, ckpt_every=1, keep_ckpts=10))
    assert run(cfg)["status"] == "done"
    return out


def test_watch_writes_every_nth_checkpoint_to_tensorboard_and_skips_done_steps(tiny_run, small_folder, tmp_path):
    data = f"imagefolder:{small_folder}"
    summary = watch.watch(tiny_run, every=3, eval_data=[data], num_workers=0)
    assert summary == {"evaluated": [3, 4], "missed": [], "finished": True}  # multiples of 3 + the final step
    rows = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert [(r["step"], r["dataset"], r["shots"]) for r in rows] == [(3, small_folder.name, "all"),
                                                                    (4, small_folder.name, "all")]
    tag = f"eval/{small_folder.name}/all"
    assert eval_scalars(tiny_run, tag) == [(r["step"], pytest.approx(r["mean"], rel=1e-6)) for r in rows]
    assert [s for s, _ in eval_scalars(tiny_run, "train/loss")] == [1, 2, 3, 4]  # the trainer's events still read
    # the same numbers as kshot.py on that checkpoint
    (expected,) = kshot.main(["--checkpoint", str(tiny_run / "checkpoint_000003.pt"), "--datasets", data,
                              "--shots", "all", "--num-workers", "0", "--cache-dir", ""])
    assert expected["mean"] == rows[0]["mean"] and expected["model"] == rows[0]["model"] == "vit_t LeJEPA step 3"
    table = (tiny_run / "eval" / "kshot.md").read_text().splitlines()
    assert table[0] == f"| step | {small_folder.name} |" and table[2] == f"| 3 | {rows[0]['mean']:.1f} |"
    # re-run: nothing to do, no new event file; --every 2 then adds step 2 only
    events = sorted((tiny_run / "tb").glob("*.eval"))
    assert len(events) == 1
    assert watch.watch(tiny_run, every=3, eval_data=[data], num_workers=0)["evaluated"] == []
    assert sorted((tiny_run / "tb").glob("*.eval")) == events
    assert watch.main(["--run", str(tiny_run), "--every", "2", "--eval-data", data, "--num-workers", "0"])[
        "evaluated"] == [2]
    assert sorted(s for s, _ in eval_scalars(tiny_run, tag)) == [2, 3, 4]  # TensorBoard orders by step


def test_watch_bad_input_is_a_clear_error(tiny_run, tmp_path, small_folder):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as exc:
            watch.main(list(argv))
        return str(exc.value.code)

    assert f"--run {tmp_path / 'nope'} does not exist" in fails("--run", str(tmp_path / "nope"), "--every", "1",
                                                                "--eval-data", f"imagefolder:{small_folder}")
    assert "root folder does not exist" in fails("--run", str(tiny_run), "--every", "1", "--eval-data",
                                                 f"imagefolder:{tmp_path / 'x'}")
    assert "share a name" in fails("--run", str(tiny_run), "--every", "1", "--eval-data",
                                   f"imagefolder:{small_folder}", f"imagefolder:{small_folder}")
    with watch.exclusive(tiny_run / "eval" / ".watch.lock"):
        assert "another watcher" in fails("--run", str(tiny_run), "--every", "1", "--eval-data",
                                          f"imagefolder:{small_folder}")


@pytest.mark.slow
def test_watch_follows_a_live_run_through_keep_k_rotation(imagenette, small_folder, tmp_path):
    """A watcher started before the run follows it while keep-1 rotation deletes every checkpoint one step
    later: it never crashes, counts what it missed and stops after the final checkpoint."""
    from test_trainer import TINY_FLAGS

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    watcher = subprocess.Popen([sys.executable, str(REPO / "evaluation" / "watch.py"), "--run", str(out), "--every",
                                "1", "--eval-data", f"imagefolder:{small_folder}", "--follow", "--poll", "0.1",
                                "--num-workers", "0"], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    subprocess.run([sys.executable, str(REPO / "launchers" / "local.py"), *TINY_FLAGS, "--data",
                    str(imagenette / "train"), "--out", str(out), "--steps", "8", "--ckpt-every", "1",
                    "--keep-ckpts", "1"], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    stdout, _ = watcher.communicate(timeout=300)
    assert watcher.returncode == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["evaluated"][-1] == 8
    assert set(summary["evaluated"]) | set(summary["missed"]) <= set(range(1, 9))
    assert not set(summary["evaluated"]) & set(summary["missed"])
    assert [s for s, _ in eval_scalars(out, f"eval/{small_folder.name}/all")] == summary["evaluated"]


def test_watch_stops_when_its_parent_exits(tiny_run, small_folder, tmp_path):
    """--follow on a run that will never finish (total_steps beyond its checkpoints): when the process that
    started the watcher exits, the watcher makes one last pass and stops."""
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    (run_dir / "checkpoint_000002.pt").symlink_to(tiny_run / "checkpoint_000002.pt")
    (run_dir / "config.yaml").write_text("total_steps: 1000\n")
    log = tmp_path / "watch.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = (f"{sys.executable} {REPO / 'evaluation' / 'watch.py'} --run {run_dir} --every 2 --eval-data "
           f"imagefolder:{small_folder} --follow --poll 0.2 --num-workers 0 > {log} 2>&1 & sleep 1")
    subprocess.run(["bash", "-c", cmd], check=True, env=env, cwd=REPO)  # the parent exits after 1 s
    deadline = time.time() + 240
    while time.time() < deadline and '"finished"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    summary = json.loads(log.read_text().strip().splitlines()[-1])
    assert summary == {"evaluated": [2], "missed": [], "finished": False}
