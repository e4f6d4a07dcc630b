"""Learning per CPU minute: pretrain for a few wall-clock budgets, then k-shot transfer against random init.

    python benchmarks/learning.py --minutes 5 10 20 --data .cache/data/imagenette160/train \
        --transfer imagefolder:.cache/data/dtd10 imagefolder:FASHION_MNIST imagefolder:.cache/data/imagenette160
    python benchmarks/learning.py --steps 300 --label "lambd 0.2" --lambd 0.2 ...   # a sweep point at fixed steps

Each budget is one real run of `launchers/local.py --time-budget M` (any other training flag is passed
through, e.g. `--arch vit_t --lambd 0.2`), followed by `evaluation/kshot.py --baseline` (linear probe on
frozen features, 1 / 10 / all shots, against the same arch at random init) on transfer sets the run did not
pretrain on. `--steps N` runs a fixed step count instead (a sweep's screening runs: their result does not
depend on how busy the machine is; the step count that fits a budget comes from a quiet-machine
`benchmarks/train_step.py` measurement). Prints one JSON line per run and appends a table (gain of LeJEPA
over random init, in points, per shot count and dataset, and the mean over datasets) to BENCHMARKS.md.
Default transfer sets: dtd10, the embedded Fashion-MNIST, imagenette160 (train -> val).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import append_rows, emit  # noqa: E402


def default_transfer() -> list[str]:
    from pipelines.embedded import materialise

    cache = REPO / ".cache" / "data"
    return [f"imagefolder:{cache / 'dtd10'}", f"imagefolder:{materialise()}", f"imagefolder:{cache / 'imagenette160'}"]


def pretrain(out: Path, length: list[str], train_flags: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--out", str(out), "--preset", "cpu-small",
           "--log-every", "20", "--ckpt-every", "100000", *length, *train_flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"pretraining failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def kshot(run: Path, transfer: list[str], shots: list[str], seeds: int) -> list[dict]:
    out = run / "kshot.json"
    cmd = [sys.executable, str(REPO / "evaluation" / "kshot.py"), "--checkpoint", str(run), "--baseline",
           "--datasets", *transfer, "--shots", *shots, "--seeds", str(seeds), "--json", str(out),
           "--markdown", str(run / "kshot.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"k-shot evaluation failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def gains(results: list[dict]) -> dict:
    """{shots: {dataset: (lejepa, random, gain)}} plus the mean gain over datasets per shot count."""
    table: dict = {}
    for r in results:
        kind = "random" if r["model"].endswith("random init") else "lejepa"
        table.setdefault(str(r["shots"]), {}).setdefault(r["dataset"], {})[kind] = r["mean"]
    out = {}
    for shots, per in table.items():
        rows = {d: (v["lejepa"], v["random"], v["lejepa"] - v["random"]) for d, v in per.items()}
        out[shots] = {"datasets": rows, "mean_gain": sum(g for *_, g in rows.values()) / len(rows)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, nargs="+", help="wall-clock budgets (--time-budget) to run")
    length.add_argument("--steps", type=int, nargs="+", help="fixed step counts to run instead")
    ap.add_argument("--transfer", nargs="+", help="kshot.py datasets (default: dtd10, Fashion-MNIST, imagenette160)")
    ap.add_argument("--shots", nargs="+", default=["1", "10", "all"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--label", default="", help="name of this configuration in the table (a sweep point)")
    ap.add_argument("--keep", help="keep the runs in this folder (default: a temporary one)")
    ap.add_argument("--no-md", action="store_true", help="JSON lines only, no BENCHMARKS.md table")
    args, train_flags = ap.parse_known_args(argv)
    lengths = [["--time-budget", f"{m:g}"] for m in args.minutes] if args.minutes else \
        [["--steps", str(s)] for s in (args.steps or [300])]
    transfer = args.transfer or default_transfer()
    rows = []
    with tempfile.TemporaryDirectory(prefix="learning-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for length in lengths:
            run = base / ("run-" + "-".join(length).strip("-").replace("--", ""))
            summary, wall = pretrain(run, length, train_flags)
            results = kshot(run, transfer, args.shots, args.seeds)
            g = gains(results)
            record = {"label": args.label, "length": " ".join(length), "flags": " ".join(train_flags),
                      "steps": summary["step"], "pretrain_minutes": round(wall / 60, 2), "gains": g}
            emit(record)
            per_shot = " / ".join(f"{g[s]['mean_gain']:+.1f}" for s in args.shots if s in g)
            datasets = "; ".join(f"{Path(d.split(':', 1)[-1]).name} {le:.1f} vs {ra:.1f}"
                                 for d, (le, ra, _) in g.get("all", {"datasets": {}})["datasets"].items())
            rows.append([args.label or "-", " ".join(length), summary["step"], f"{wall / 60:.1f}", per_shot,
                         datasets])
    if rows and not args.no_md:
        append_rows("Learning per CPU minute: k-shot gain over random init (benchmarks/learning.py)",
                    ["config", "length", "steps", "pretrain min", f"mean gain, points ({' / '.join(args.shots)} shots)",
                     "all-shot: LeJEPA vs random (%)"], rows,
                    note=f"Training flags: `{' '.join(train_flags) or '(preset cpu-small)'}`; linear probe on frozen "
                         f"features, {args.seeds} seeds for 1/10 shots; transfer sets: {', '.join(transfer)}.")


if __name__ == "__main__":
    main()
