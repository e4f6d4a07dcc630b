"""k-shot during a run: evaluate every N-th checkpoint of a run dir, off the training path.

    python evaluation/watch.py --run runs/vitl --every 2500 \\
        --eval-data dtd:/data/dtd imagefolder:/data/pets --follow

For each checkpoint whose step is a multiple of --every (and the run's final one): the all-shot linear probe
of evaluation/kshot.py (same features, same classifier) on every --eval-data dataset. Results go to

- the run's TensorBoard: scalars `eval/<dataset>/all` (accuracy %) at the checkpoint's step, in the
  watcher's own event file `RUN/tb/events.out.tfevents.*.eval` (TensorBoard shows them beside train/*);
- `RUN/eval/results.json` (kshot.py's rows plus `step`) and `RUN/eval/kshot.md` (step x dataset), both
  rewritten atomically after each checkpoint.

Safe to re-run: steps already in results.json are skipped (one watcher per run: a second one is refused).
`--follow` keeps polling until the run is finished (its final checkpoint, `checkpoint_{total_steps:06d}.pt`
with total_steps from RUN/config.yaml, is evaluated) or the process that started the watcher exits (then
one last pass). A checkpoint that keep-K rotation deletes before it is read is skipped and counted: keep
`--keep-ckpts` large enough, or `--every` a multiple of `--ckpt-every`, for none to be missed.

Features are not cached by default (each checkpoint is read once; results.json is what a re-run reuses);
`--cache-dir DIR` caches them as kshot.py does. On a GPU machine the watcher runs on `--device` (default
cuda when present): give it a device the training leaves room on; beside a CPU training, `--threads 1`.
The trainer's `save_checkpoint(..., keep_every=N)` spares the checkpoints a watcher needs from rotation.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
import warnings
from pathlib import Path

# Who started us, read before the slow imports below (torch takes seconds): a launcher that exits while
# they run must still count as gone.
STARTED_BY = os.getppid()

if __package__ in (None, ""):  # `python evaluation/watch.py` from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from evaluation.cli import plain_warnings, positive_int
from evaluation.features import FeatureModel, default_device, from_checkpoint
from evaluation.kshot import LINEAR_PROBE_NAME, atomic_write_text, dataset_features, evaluate_shots, linear_probe
from evaluation.transfer_datasets import DatasetArg, DatasetError, Split, cap_per_class, load_dataset, parse_dataset_arg
from models import list_checkpoints
from models.probe import DEFAULT_PROBE, PROBES

TB_SUFFIX = ".eval"


def checkpoint_step(path: Path) -> int:
    return int(path.stem.split("_")[1])


def total_steps(run_dir: Path) -> int | None:
    """The run's final step from the trainer's config.yaml (None until the trainer has written it)."""
    try:
        return int((yaml.safe_load((run_dir / "config.yaml").read_text()) or {})["total_steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def load_eval_data(texts: list[str], max_train_per_class: int | None = None,
                   max_test_per_class: int | None = None) -> list[tuple[DatasetArg, Split, Split]]:
    out = []
    for text in texts:
        arg = parse_dataset_arg(text)
        train, test = load_dataset(arg)
        out.append((arg, cap_per_class(train, max_train_per_class), cap_per_class(test, max_test_per_class)))
    labels = [arg.label for arg, _, _ in out]
    if len(set(labels)) != len(labels):
        raise DatasetError(f"--eval-data: two datasets share a name ({', '.join(labels)}); their tags would clash")
    return out


def evaluate_all_shot(model: FeatureModel, datasets: list[tuple[DatasetArg, Split, Split]],
                      device: torch.device | None = None, cache_dir: str | Path | None = None,
                      max_train_per_class: int | None = None, max_test_per_class: int | None = None,
                      **extract_kw) -> list[dict]:
    """kshot.py's all-shot linear probe of one model on each dataset: one result row per dataset."""
    device = device or default_device()
    rows = []
    for arg, train, test in datasets:
        feats = dataset_features(model, arg, train, test, cache_dir, max_train_per_class, max_test_per_class,
                                 device=device, **extract_kw)
        r = evaluate_shots(feats, "all", 1, linear_probe, device)
        rows.append({"step": model.info["step"], "dataset": arg.label, "model": model.name, **r,
                     "classifier": LINEAR_PROBE_NAME, "n_train": len(train.labels), "n_test": len(test.labels),
                     "max_train_per_class": max_train_per_class, "max_test_per_class": max_test_per_class,
                     "model_info": model.info})
    return rows


def results_markdown(rows: list[dict]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    acc = {(r["step"], r["dataset"]): r["mean"] for r in rows}
    lines = ["| step | " + " | ".join(datasets) + " |", "|---:|" + "---:|" * len(datasets)]
    for step in sorted({r["step"] for r in rows}):
        lines.append(f"| {step} | " + " | ".join(f"{acc[step, d]:.1f}" if (step, d) in acc else "–"
                                                 for d in datasets) + " |")
    probe = rows[0]["model_info"].get("probe", DEFAULT_PROBE) if rows else DEFAULT_PROBE
    return "\n".join(lines) + f"\n\n- all-shot {LINEAR_PROBE_NAME}; probe `{probe}`; accuracy % on the test split\n"


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """Refuse a second watcher on the same run (they would both rewrite results.json)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another watcher is evaluating this run (it holds {lock_path})") from None
        yield


def watch(run_dir: str | Path, every: int, eval_data: list[str], follow: bool = False, poll_s: float = 30.0,
          probe: str = DEFAULT_PROBE, device: torch.device | None = None, cache_dir: str | Path | None = None,
          max_train_per_class: int | None = None, max_test_per_class: int | None = None,
          batch_size: int = 128, num_workers: int = 2) -> dict:
    """Evaluate the run's pending checkpoints (see the module docstring); returns {"evaluated": steps,
    "missed": steps deleted or unreadable before they were read, "finished": final step evaluated}."""
    run_dir = Path(run_dir)
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    if not follow and not run_dir.is_dir():
        raise FileNotFoundError(f"--run {run_dir} does not exist")
    datasets = load_eval_data(eval_data, max_train_per_class, max_test_per_class)
    device = device or default_device()
    eval_dir = run_dir / "eval"
    results_path = eval_dir / "results.json"
    summary = {"evaluated": [], "missed": [], "finished": False}
    writer = None
    with exclusive(eval_dir / ".watch.lock"):
        rows = json.loads(results_path.read_text()) if results_path.is_file() else []
        labels = {arg.label for arg, _, _ in datasets}
        done = {s for s in {r["step"] for r in rows} if labels <= {r["dataset"] for r in rows if r["step"] == s}}
        missed: set[int] = set()
        try:
            last_pass = not follow
            while True:
                total = total_steps(run_dir)
                pending = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) not in done | missed
                           and (checkpoint_step(p) % every == 0 or checkpoint_step(p) == total)]
                for path in tqdm(pending, desc="eval checkpoints", unit="ckpt", leave=False):
                    step = checkpoint_step(path)
                    try:
                        model = from_checkpoint(path, probe=probe)
                    except (FileNotFoundError, ValueError) as e:
                        # keep-K rotation deleted it between the listing and the read, or it is unreadable
                        missed.add(step)
                        why = "deleted before it was read" if not path.exists() else str(e)
                        warnings.warn(f"checkpoint {path}: {why}; skipped ({len(missed)} so far)", stacklevel=2)
                        continue
                    new = evaluate_all_shot(model, datasets, device, cache_dir, max_train_per_class, max_test_per_class,
                                            batch_size=batch_size, num_workers=num_workers)
                    if writer is None:
                        writer = SummaryWriter(run_dir / "tb", filename_suffix=TB_SUFFIX)
                    for r in new:
                        writer.add_scalar(f"eval/{r['dataset']}/all", r["mean"], step)
                    writer.flush()
                    rows = [r for r in rows if r["step"] != step] + new
                    atomic_write_text(results_path, json.dumps(rows, indent=1) + "\n")
                    atomic_write_text(eval_dir / "kshot.md", results_markdown(rows))
                    done.add(step)
                    summary["evaluated"].append(step)
                    tqdm.write(f"step {step}: " + ", ".join(f"{r['dataset']} {r['mean']:.1f}" for r in new))
                summary["finished"] = total is not None and total in done
                if last_pass or summary["finished"]:
                    break
                if os.getppid() != STARTED_BY:  # whoever started us (the launcher) is gone: one last pass
                    last_pass = True
                    continue
                time.sleep(poll_s)
        finally:
            if writer is not None:
                writer.close()
    summary["missed"] = sorted(missed)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run dir (--out of the training)")
    parser.add_argument("--every", type=positive_int, required=True, help="evaluate checkpoints whose step is a "
                        "multiple of N (and the final one)")
    parser.add_argument("--eval-data", nargs="+", required=True, metavar="NAME:ROOT",
                        help="datasets as in kshot.py --datasets (dtd:ROOT, imagefolder:DIR, ...)")
    parser.add_argument("--follow", action="store_true", help="keep polling until the run is finished or the "
                        "process that started the watcher exits")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between polls with --follow")
    parser.add_argument("--probe", choices=PROBES, default=DEFAULT_PROBE, help="features read (see kshot.py)")
    parser.add_argument("--cache-dir", default="", help="feature cache (default: none)")
    parser.add_argument("--max-train-per-class", type=positive_int)
    parser.add_argument("--max-test-per-class", type=positive_int)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--num-workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (beside a CPU training, e.g. 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = watch(args.run, args.every, args.eval_data, args.follow, args.poll, args.probe,
                        torch.device(args.device) if args.device else None, args.cache_dir or None,
                        args.max_train_per_class, args.max_test_per_class, args.batch_size, args.num_workers)
    except (DatasetError, FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    plain_warnings()
    main()
