"""trainer/ + launchers/local.py on real images (imagenette160 fixture), real TensorBoard files, real
DDP processes (gloo) and a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launchers.local import main as launcher_main
from models import encoder_from_checkpoint, list_checkpoints, load_checkpoint
from pipelines import available
from pipelines.spec import SPEC_PRESETS
from trainer import TrainConfig, run

REPO = Path(__file__).resolve().parents[1]
TAGS = ("train/loss", "train/pred", "train/sigreg", "train/lr", "probe/acc", "perf/images_per_s",
        "perf/data_wait_frac", "perf/step_ms", "monitor/rankme", "monitor/sigreg_global", "monitor/sigreg_local",
        "monitor/emb_std")
TINY_SPEC = SPEC_PRESETS["cpu-small"].replace(global_size=32, local_size=16, local_views=2)
# Small enough for 2 cores: ViT-tiny/8 on 2x32 + 2x16 px views, a narrow projector, few slices.
# In-process runs use fp32 (faster than emulated bf16 on CPUs without AMX); the loop test and the
# kill -9 resume test run the default bf16 autocast path.
TINY = dict(arch="vit_t", patch_size=8, batch_size=8, proj_dim=32, hidden_dim=64, num_slices=64, lambd=0.1,
            lr=2e-3, log_every=1, image_every=0, num_workers=0, spec=TINY_SPEC, amp=False)
TINY_FLAGS = ["--arch", "vit_t", "--patch-size", "8", "--batch-size", "8", "--proj-dim", "32", "--hidden-dim", "64",
              "--num-slices", "64", "--lambd", "0.1", "--lr", "2e-3", "--log-every", "1", "--image-every", "0",
              "--num-workers", "0", "--global-size", "32", "--local-size", "16", "--local-views", "2",
              "--backend", "torchvision"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def tiny(tmp_path, data, **kw) -> TrainConfig:
    return TrainConfig(**dict(TINY, data=str(data), out=str(tmp_path / "run"), **kw))


def scalars(run_dir, tag="train/loss") -> list[tuple[int, float]]:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def launcher(out, data, *flags) -> list[str]:
    return [sys.executable, str(REPO / "launchers" / "local.py"), *TINY_FLAGS, "--data", str(data), "--out",
            str(out), *flags]


SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # 1 thread: same sums every run


# ------------------------------------------------------------------------------------------ the loop


def small_imagefolder(imagenette, root: Path, classes: int = 2, per_class: int = 16) -> Path:
    for cls in sorted((imagenette / "train").iterdir())[:classes]:
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (root / cls.name / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.dali),
                                     pytest.param("ffcv", marks=[pytest.mark.ffcv, pytest.mark.slow])])
def test_loop_runs_logs_every_tag_and_checkpoints(tmp_path, imagenette, backend):
    if not available(backend) or not (REPO / "pipelines" / f"{backend}_backend.py").exists():
        pytest.skip(f"backend {backend} not available here")
    data = imagenette / "train"
    if backend == "ffcv":  # FFCV reads a .beton: convert 64 of the same photos
        from pipelines.convert_ffcv import convert

        data = tmp_path / "small.beton"
        convert(str(small_imagefolder(imagenette, tmp_path / "small", per_class=32)), data, max_resolution=160,
                num_workers=2)
    cfg = tiny(tmp_path, data, backend=backend, steps=4, ckpt_every=2, image_every=2, amp=True)
    summary = run(cfg)
    assert summary["status"] == "done" and summary["step"] == 4 and summary["skipped_steps"] == 0

    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert set(TAGS) <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("views")] == [2, 4]
    # label-free curves: the loss's SIGReg is the view-weighted mean of the two groups' (same directions)
    spec = cfg.spec
    for s_tot, s_glob, s_loc in zip(*(acc.Scalars(t) for t in ("train/sigreg", "monitor/sigreg_global",
                                                                  "monitor/sigreg_local"))):
        mixed = (spec.global_views * s_glob.value + spec.local_views * s_loc.value) / spec.num_views
        assert mixed == pytest.approx(s_tot.value, rel=1e-3)
    assert all(1.0 <= e.value <= 2 * cfg.batch_size for e in acc.Scalars("monitor/rankme"))
    acc_values = [e.value for e in acc.Scalars("probe/acc")]
    assert all(0.0 <= a <= 1.0 for a in acc_values)
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("perf/data_wait_frac"))
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] < lrs[1] or lrs[0] == pytest.approx(cfg.lr)  # warmup (10 % of 4 steps = 1 step) then cosine
    assert lrs[-1] == pytest.approx(cfg.lr * 1e-3, rel=1e-3)  # cosine ends at lr/1000

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["arch"] == "vit_t" and saved["spec"]["global_size"] == 32 and saved["total_steps"] == 4
    # the run's plan, as the launcher printed it: in config.yaml and as TensorBoard text
    assert (saved["plan"]["arch"], saved["plan"]["steps"], saved["plan"]["world_size"]) == ("vit_t", 4, 1)
    assert saved["plan"]["views"]["local"] == {"count": 2, "size": 16, "scale": [0.05, 0.3]}
    assert "plan/text_summary" in acc.Tags()["tensors"]

    files = list_checkpoints(tmp_path / "run")
    assert [f.name for f in files] == ["checkpoint_000002.pt", "checkpoint_000004.pt"]
    ckpt = load_checkpoint(files[-1])
    assert {"format", "step", "epoch", "step_in_epoch", "world_size", "config", "model", "optimizer", "scheduler",
            "scaler", "probe", "rng", "code_version"} <= set(ckpt)
    assert (ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"], ckpt["world_size"]) == (4, 0, 4, 1)
    encoder, config = encoder_from_checkpoint(ckpt)
    assert config["arch"] == "vit_t" and encoder.probe_features(torch.randn(1, 3, 32, 32)).shape == (1, 384)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_small_set(tmp_path, imagenette):
    small = small_imagefolder(imagenette, tmp_path / "small")
    # 32 images, one batch: the same images (new augmentations) every step. λ 0.5 and 256 slices so the
    # fall of SIGReg dominates the batch-to-batch noise; the prediction term rises as embeddings spread.
    summary = run(tiny(tmp_path, small, steps=10, batch_size=32, ckpt_every=100, warmup=2, lambd=0.5, lr=5e-3,
                       num_slices=256))
    assert summary["status"] == "done"
    loss = [v for _, v in scalars(tmp_path / "run")]
    assert sum(loss[-3:]) / 3 < 0.8 * sum(loss[:3]) / 3, loss


def test_nan_loss_steps_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, imagenette, capsys):
    # lr 1e30: the first update blows the weights up, every later step is non-finite.
    summary = run(tiny(tmp_path, imagenette / "train", steps=20, lr=1e30, warmup=0, max_bad_steps=3,
                       ckpt_every=100))
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3 and summary["step"] == 4
    err = capsys.readouterr().out
    assert "non-finite" in err and "3 consecutive non-finite steps" in err
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


def test_a_training_step_reads_nothing_back_and_skips_a_non_finite_step_on_the_device(tmp_path, monkeypatch):
    """The step makes no device->host read (on a GPU each would drain the queue): it is checked here by
    counting every Tensor -> Python read during a step; tests/test_gpu.py checks the same on CUDA with
    torch.cuda.set_sync_debug_mode. A NaN batch then leaves weights, optimizer state and BN statistics as
    they were, counted on the device."""
    from pipelines import Batch
    from trainer.schedule import Schedule
    from trainer.train import Distributed, Training

    cfg = tiny(tmp_path, tmp_path, arch="resnet18", patch_size=None, steps=5)
    training = Training(cfg, Distributed(0, 1, torch.device("cpu"), False), num_classes=3, schedule=Schedule(5, 1))
    training.distribute(0)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(4, 2, 3, 32, 32, generator=g), torch.randn(4, 2, 3, 16, 16, generator=g),
                  torch.tensor([0, 1, 2, -1]))
    training.step(lambda: batch)  # first step: lazy optimizer state
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _f=original, _n=name, **k: (reads.append(_n), _f(self, *a, **k))[1])
    training.step(lambda: batch)
    monkeypatch.undo()
    assert reads == []

    state = {k: v.clone() for k, v in training.module.state_dict().items()}
    adam = [{k: v.clone() for k, v in s.items()} for s in training.optimizer.state.values()]
    nan_batch = batch._replace(global_views=torch.full_like(batch.global_views, float("nan")))
    training.step(lambda: nan_batch)
    assert all(torch.equal(v, state[k]) for k, v in training.module.state_dict().items()
               if "num_batches_tracked" not in k)
    assert all(torch.equal(v, before[k]) for s, before in zip(training.optimizer.state.values(), adam)
               for k, v in s.items())
    figures, bad, _ = training.read_window()
    assert bad == 1 and figures[5] == 1  # SKIPPED
    training.step(lambda: batch)  # a finite step again: the run of bad steps resets
    assert training.read_window()[1] == 0
    assert not torch.equal(training.module.state_dict()["encoder.backbone.conv1.weight"],
                           state["encoder.backbone.conv1.weight"])


@pytest.mark.slow
def test_eval_every_runs_kshot_on_checkpoints_beside_the_training(tmp_path, imagenette, dtd10):
    """local.py --eval-every: a background evaluation/watch.py evaluates every N-th checkpoint (all-shot linear
    probe) into the run's TensorBoard and OUT/eval/; the launcher waits for it to finish the final one."""
    out = tmp_path / "run"
    proc = subprocess.run(launcher(out, imagenette / "train", "--steps", "4", "--ckpt-every", "2", "--keep-ckpts", "1",
                                   "--eval-every", "2", "--eval-data", f"imagefolder:{dtd10}"),
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "k-shot watcher started" in proc.stdout
    rows = json.loads((out / "eval" / "results.json").read_text())
    assert sorted(r["step"] for r in rows) == [2, 4] and all(0 < r["mean"] <= 100 for r in rows)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_000002.pt", "checkpoint_000004.pt"]  # spared
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.startswith("eval/"))
    assert [e.step for e in acc.Scalars(tag)] == [2, 4]
    assert [e.value for e in acc.Scalars(tag)] == pytest.approx([r["mean"] for r in sorted(rows, key=lambda r: r["step"])])


def test_eval_every_needs_eval_data_and_a_checkpoint_multiple(tmp_path, capsys):
    assert launcher_main(["--out", str(tmp_path / "x"), "--eval-every", "100"]) == 2
    assert "--eval-every and --eval-data go together" in capsys.readouterr().err
    assert launcher_main(["--out", str(tmp_path / "x"), "--eval-every", "150", "--ckpt-every", "100",
                          "--eval-data", f"imagefolder:{tmp_path}"]) == 2
    assert "must be a positive multiple of --ckpt-every 100" in capsys.readouterr().err
    assert launcher_main(["--out", str(tmp_path / "x"), "--eval-every", "100", "--ckpt-every", "100",
                          "--eval-data", "dtd"]) == 2
    assert "expected NAME:ROOT" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- time budget


def test_time_budget_fixes_the_schedule_and_a_resume_keeps_it_exactly(tmp_path, imagenette):
    """--time-budget: 3 steps at LR 0 time the step, warmup = 10 % of what the budget holds, the total is
    fixed after warmup (config.yaml, checkpoints) and the run ends checkpointed near the budget. Resuming
    from a checkpoint taken after the total was fixed replays the same losses to the end."""
    from trainer.schedule import CALIBRATION_STEPS

    budget = 0.5  # minutes
    summary = run(tiny(tmp_path, imagenette / "train", time_budget=budget, ckpt_every=5))
    total = summary["total_steps"]
    assert summary["status"] == "done" and total is not None and summary["step"] <= total
    assert summary["minutes"] < 1.5 * budget  # the end is planned inside the budget (slack for a busy machine)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["total_steps"] == total and saved["time_budget"] == budget and saved["steps"] is None
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == summary["step"] and ckpt["budget"]["used_s"] > 0

    lrs = [v for _, v in scalars(tmp_path / "run", "train/lr")]  # at step s: the LR of the next step
    assert lrs[:CALIBRATION_STEPS - 1] == [0.0] * (CALIBRATION_STEPS - 1)
    warmup = round(TINY["lr"] / lrs[CALIBRATION_STEPS - 1])  # the first warmup step runs at lr / warmup
    assert warmup >= 1 and max(lrs) == pytest.approx(TINY["lr"])
    assert lrs[CALIBRATION_STEPS + warmup - 2] == pytest.approx(TINY["lr"])  # the warmup reaches the peak
    if summary["step"] == total:
        assert lrs[-1] == pytest.approx(TINY["lr"] * 1e-3, rel=1e-3)  # and the cosine its end

    fixed = CALIBRATION_STEPS + warmup  # the total is known from this step on
    mid = min((p for p in list_checkpoints(tmp_path / "run") if fixed <= int(p.stem.split("_")[1]) < summary["step"]),
              key=lambda p: p.name, default=None)
    assert mid is not None, f"no checkpoint between the fixed total (step {fixed}) and the end ({summary})"
    (tmp_path / "again" / "run").mkdir(parents=True)
    (tmp_path / "again" / "run" / mid.name).write_bytes(mid.read_bytes())
    again = run(tiny(tmp_path / "again", imagenette / "train", time_budget=budget, ckpt_every=5))
    assert again["total_steps"] == total
    common = min(again["step"], summary["step"])  # the safety net may stop either run a little early
    first = int(mid.stem.split("_")[1]) + 1
    ref = [(s, v) for s, v in scalars(tmp_path / "run") if first <= s <= common]
    assert ref and [(s, v) for s, v in scalars(tmp_path / "again" / "run") if first <= s <= common] == ref


def test_time_budget_that_cannot_hold_the_warmup_is_a_clear_error(tmp_path, imagenette):
    with pytest.raises(ValueError, match=r"--time-budget 0\.01 min cannot hold the warmup: 10000 steps"):
        run(tiny(tmp_path, imagenette / "train", time_budget=0.01, warmup=10000))
    with pytest.raises(ValueError, match="exactly one of --steps / --epochs / --time-budget"):
        run(tiny(tmp_path, imagenette / "train", time_budget=1, steps=3))


# --------------------------------------------------------------------------------------- checkpoints


def test_truncated_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, imagenette, capsys):
    run(tiny(tmp_path, imagenette / "train", steps=4, ckpt_every=2))
    latest = tmp_path / "run" / "checkpoint_000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"checkpoint_000004\.pt is truncated or corrupt"):
        summary = run(tiny(tmp_path, imagenette / "train", steps=5, ckpt_every=2))
    assert "resumed from" in capsys.readouterr().out.split("checkpoint_000002.pt")[0]
    assert summary["status"] == "done" and summary["step"] == 5
    assert load_checkpoint(tmp_path / "run")["step"] == 5


def test_resume_refuses_other_config_and_no_resume(tmp_path, imagenette):
    run(tiny(tmp_path, imagenette / "train", steps=1, ckpt_every=1))
    with pytest.raises(ValueError, match=r"lambd=0\.1 but this run has lambd=0\.3"):
        run(tiny(tmp_path, imagenette / "train", steps=2, lambd=0.3))
    with pytest.raises(ValueError, match=r"arch='vit_t' but this run has arch='vit_s'"):
        run(tiny(tmp_path, imagenette / "train", steps=2, arch="vit_s"))
    with pytest.raises(ValueError, match="already holds checkpoints and --no-resume"):
        run(tiny(tmp_path, imagenette / "train", steps=2, resume=False))


def test_preemption_signal_saves_and_chains_the_previous_handler(tmp_path, imagenette):
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    tb = tmp_path / "run" / "tb"

    def send_when_training():  # the loop has started once the TensorBoard dir exists
        deadline = time.time() + 120
        while not tb.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=send_when_training)
    sender.start()
    try:
        summary = run(tiny(tmp_path, imagenette / "train", steps=500, ckpt_every=1000))
    finally:
        sender.join()
        signal.signal(signal.SIGUSR1, previous)
    assert summary["status"] == "preempted" and 0 < summary["step"] < 500
    assert seen == [signal.SIGUSR1]  # our handler ran first (flag), then chained to the one before it
    assert load_checkpoint(tmp_path / "run")["step"] == summary["step"]
    resumed = run(tiny(tmp_path, imagenette / "train", steps=summary["step"] + 1,
                       ckpt_every=1000))
    assert resumed["status"] == "done" and resumed["step"] == summary["step"] + 1


@pytest.mark.slow
def test_exact_resume_after_kill_9(tmp_path, imagenette):
    """kill -9 after a checkpoint, rerun the same command: train/loss bit-equal at every step."""
    data, steps = imagenette / "train", "12"
    ref = subprocess.run(launcher(tmp_path / "ref", data, "--steps", steps, "--ckpt-every", "3"),
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    cmd = launcher(out, data, "--steps", steps, "--ckpt-every", "3")
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint_000003.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it log a step or two past the checkpoint (those events must be purged)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL

    resumed = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    for tag in ("train/loss", "train/pred", "train/sigreg", "probe/acc"):
        assert scalars(out, tag) == scalars(tmp_path / "ref", tag), tag
    assert [s for s, _ in scalars(out)] == list(range(1, 13))


@pytest.fixture
def http_shards(tmp_path, imagenette):
    """8 shards x 6 imagenette photos (4 classes) with their index, served by a loopback http.server;
    train-005.tar is missing (404), so every epoch skips it and its rank runs a lap to fill the epoch."""
    import functools
    import http.server

    from pipelines.write_shards import write_shards

    folder = small_imagefolder(imagenette, tmp_path / "small", classes=4, per_class=12)
    write_shards(folder, str(tmp_path / "shards" / "train-%03d.tar"), max_count=6, progress=False)
    (tmp_path / "shards" / "train-005.tar").unlink()

    class Quiet(http.server.SimpleHTTPRequestHandler):  # no Range support: a resume reads and drops
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=str(tmp_path / "shards")))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/train-{{000..007}}.tar"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_exact_resume_after_kill_9_streamed_over_http(tmp_path, http_shards):
    """The same as above for shards streamed over HTTP, with workers decoding ahead of the trainer, a shuffle
    buffer across batches, a missing shard skipped (counted in TensorBoard) and laps, over two epochs."""
    flags = ["--steps", "12", "--ckpt-every", "3", "--shuffle-buffer", "10", "--shard-retries", "0",
             "--num-workers", "2"]
    ref = subprocess.run(launcher(tmp_path / "ref", http_shards, *flags), env=SUBPROCESS_ENV, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "skipping shard" in ref.stderr and "train-005.tar" in ref.stderr

    out = tmp_path / "killed"
    cmd = launcher(out, http_shards, *flags)
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint_000003.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL

    resumed = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "not exact" not in resumed.stderr
    for tag in ("train/loss", "train/pred", "train/sigreg", "probe/acc"):
        assert scalars(out, tag) == scalars(tmp_path / "ref", tag), tag
    assert [s for s, _ in scalars(out)] == list(range(1, 13))
    # cumulative counters: train-005.tar skipped once per epoch, one lap each; carried through the checkpoint
    # (a skip in the read-ahead past the checkpointed position may count twice)
    assert scalars(tmp_path / "ref", "data/skipped_shards")[-1][1] == 2
    assert scalars(out, "data/skipped_shards")[-1][1] >= 2
    assert scalars(tmp_path / "ref", "data/laps")[-1][1] >= 2


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path, imagenette):
    data = imagenette / "train"
    common = ["--steps", "3", "--no-amp", "--ckpt-every", "100"]
    one = subprocess.run(launcher(tmp_path / "one", data, *common, "--batch-size", "16"), env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(launcher(tmp_path / "two", data, *common, "--batch-size", "8", "--nproc", "2"),
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert load_checkpoint(tmp_path / "two")["world_size"] == 2
    for tag in ("train/loss", "train/pred", "train/sigreg"):
        a, b = scalars(tmp_path / "one", tag), scalars(tmp_path / "two", tag)
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
        # fp32; the only differences are summation order (all-reduce of moments, ECF and grads)
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-4), tag


# ------------------------------------------------------------------------------------------ bad flags


@pytest.mark.parametrize("flags, message", [
    (["--arch", "vit_q"], "unknown arch 'vit_q'; valid: vit_t, vit_s"),
    (["--backend", "pil"], "unknown backend 'pil'; valid: auto, dali, ffcv, torchvision"),
    (["--preset", "huge"], "unknown preset 'huge'; valid: seed, cpu-small"),
    (["--data", "/no/such/dir"], "--data '/no/such/dir' does not exist"),
    (["--lambd", "2"], "--lambd must be in [0, 1]"),
    (["--arch", "resnet18", "--patch-size", "8"], "--patch-size only applies to ViT"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--collective-timeout", "-5"], "--collective-timeout must be > 0 seconds, got -5.0"),
    (["--data-timeout", "0"], "--data-timeout must be > 0 seconds, got 0.0"),
    (["--max-ckpt-failures", "0"], "--max-ckpt-failures must be >= 1, got 0"),
    (["--data", "s3://bucket/train-{000..009}.tar"], "unknown scheme 's3'"),
    (["--data", "https://127.0.0.1:1/train-{000..009}.tar"], "cannot read any of its first 3 shard(s): "
                                                             "https://127.0.0.1:1/train-000.tar"),
    (["--data", "http://127.0.0.1:1/train-{009..000}.tar"], "expands to zero shards"),
    (["--data", "pipe:exit 3"], "'pipe:exit 3': cannot read any of its first 1 shard(s): pipe:exit 3: exited with "
                                "status 3"),
    (["--data", "/no/such/dir", "--stream"], "'/no/such/dir': cannot read any"),
    (["--stream"], "--stream needs --data"),
    (["--shuffle-buffer", "0"], "--shuffle-buffer must be >= 1"),
    (["--shard-retries", "-1"], "--shard-retries must be >= 0"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    assert launcher_main(["--out", str(tmp_path / "x"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_data_dir_without_images_is_rejected(tmp_path, capsys):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    assert launcher_main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_steps_and_epochs_are_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        launcher_main(["--steps", "3", "--epochs", "1", "--out", str(tmp_path / "x")])


def test_presets_fill_unset_flags_and_flags_win():
    import argparse

    from trainer import add_config_args, config_from_args

    parser = add_config_args(argparse.ArgumentParser())
    small = config_from_args(parser.parse_args([]))
    assert (small.preset, small.arch, small.patch_size, small.spec) == ("cpu-small", "resnet18", None,
                                                                          SPEC_PRESETS["cpu-small"])
    assert small.effective_weight_decay == 5e-4  # ResNet
    vit = config_from_args(parser.parse_args(["--arch", "vit_t", "--global-size", "48", "--steps", "7"]))
    assert (vit.patch_size, vit.spec.global_size, vit.spec.local_size, vit.steps) == (8, 48, 32, 7)
    assert vit.effective_weight_decay == 5e-2  # ViT (ConvNeXt too: AdamW-trained nets)
    seed = config_from_args(parser.parse_args(["--preset", "seed", "--lr", "1e-4"]))
    assert (seed.arch, seed.epochs, seed.steps, seed.lr, seed.spec) == ("vit_l", 100, None, 1e-4, SPEC_PRESETS["seed"])


def test_local_preset_is_seed_with_cuda_and_cpu_small_without(monkeypatch):
    """The device query is patched both ways: no GPU exists on the CI machines, so the CUDA case can only be
    simulated here (nothing CUDA runs: only the flag defaults are read)."""
    import launchers.local as local

    for cuda, preset in ((True, "seed"), (False, "cpu-small")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert local.parse_args([]).preset == preset
        assert local.parse_args(["--preset", "cpu-small"]).preset == "cpu-small"  # --preset overrides
        assert local.parse_args(["--preset", "seed"]).preset == "seed"


def test_local_dry_run_prints_the_cpu_preset_plan_and_starts_nothing(tmp_path, capsys):
    assert launcher_main(["--dry-run", "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    expected = "plan: preset seed" if torch.cuda.is_available() else "plan: preset cpu-small"
    assert out.startswith(expected)
    if not torch.cuda.is_available():
        for piece in ("resnet18", "2 global x 64 px", "6 local x 32 px", "64 per rank x 1 rank(s)",
                      "300 steps", "embedded Fashion-MNIST (JPEG ImageFolder), 5,000 images, 10 classes",
                      "1 CPU process(es), world size 1"):
            assert piece in out, piece
    assert not (tmp_path / "x").exists()


def test_embedded_fashion_mnist_is_a_balanced_imagefolder(tmp_path):
    import numpy as np
    from PIL import Image

    from pipelines.embedded import CLASSES, DEBIAN_DIR, FILES, _read_idx, materialise

    if not DEBIAN_DIR.exists():
        pytest.fail("Debian package dataset-fashion-mnist is not installed (make install)")
    root = materialise(tmp_path / "fm", per_class=3, test_per_class=2)
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASSES)
        assert all(len(list((root / split / c).glob("*.jpg"))) == count for c in CLASSES)
    # the files hold the IDX images of their class (JPEG: close, not equal)
    images = _read_idx(DEBIAN_DIR / FILES["train"][0], 2051)
    labels = _read_idx(DEBIAN_DIR / FILES["train"][1], 2049)
    f = sorted((root / "train" / "bag").glob("*.jpg"))[0]
    index = int(f.stem)
    assert CLASSES[labels[index]] == "bag"
    assert np.abs(np.asarray(Image.open(f), dtype=np.int16) - images[index]).mean() < 4
    assert materialise(tmp_path / "fm", per_class=3, test_per_class=2) == root  # built once
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        materialise(tmp_path / "other", source_dir=tmp_path / "nowhere")
