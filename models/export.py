"""Export a trained backbone as a folder that timm and the Hugging Face hub read as it is.

    python models/export.py --checkpoint runs/vitl --out exports/vitl

`DIR/model.safetensors`  the backbone only, under timm's own key names (no projector, no optimizer);
`DIR/config.json`        timm's hub layout: `architecture`, `num_classes` 0, `model_args` (what `create_model`
                         needs to rebuild exactly this network: ViT patch size, image size, dynamic size/pad),
                         `pretrained_cfg` (input size, mean/std, interpolation, crop), plus a `lejepa` block
                         (arch, step, training config, code version) that timm ignores and evaluation reads;
`DIR/README.md`          a model card: recipe, code version, how to load it, the run's k-shot table if any.

Then, without this project:

    timm.create_model("local-dir:DIR", pretrained=True)          # or "hf-hub:USER/REPO" once pushed
    timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="DIR/model.safetensors"), **cfg["model_args"])

The folder is written in a temporary sibling and renamed into place, so `--out` is either complete or absent.
The checkpoint is read with `torch.load(weights_only=True)` (models.checkpoint), as resume reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python models/export.py` from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors.torch
import timm
import yaml
from torch import nn

from models.checkpoint import encoder_from_checkpoint, load_checkpoint
from models.probe import DEFAULT_PROBE
from models.registry import ARCHS, timm_args

EXPORT_FORMAT = "lejepa-export/1"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
# The evaluation input recipe (evaluation/features.py reads it from here): resize the short side to
# size / crop_pct with torchvision's default bilinear interpolation, then centre-crop `size`.
CROP_PCT = 0.875
INTERPOLATION = "bilinear"


# ---------------------------------------------------------------------------------------------- reading
def is_export(path: str | Path) -> bool:
    """A folder holding an exported `config.json` (the evaluation scripts accept it as --checkpoint)."""
    return (Path(path) / CONFIG).is_file()


def read_export_config(path: str | Path) -> dict:
    """config.json of an export, checked: ours (`lejepa` block), a known arch, the weights file present."""
    path = Path(path)
    cfg_file, weights = path / CONFIG, path / WEIGHTS
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"export {path}: cannot read {cfg_file}: {e}") from e
    meta = cfg.get("lejepa") if isinstance(cfg, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"export {path}: {cfg_file} is not a {EXPORT_FORMAT} export (no 'lejepa' block); "
                         "for another timm model use --timm NAME --timm-weights FILE")
    if meta.get("arch") not in ARCHS:
        raise ValueError(f"export {path} has unknown arch {meta.get('arch')!r}; valid: {', '.join(ARCHS)}")
    if not weights.is_file():
        raise FileNotFoundError(f"export {path}: {weights} does not exist")
    return cfg


def load_export(path: str | Path) -> tuple[nn.Module, dict]:
    """(timm backbone in eval mode, config.json) of an export. timm rebuilds the network from config.json
    (`local-dir:`, as a hub user would) and the weights are loaded strictly: every key, every shape."""
    path = Path(path)
    cfg = read_export_config(path)
    model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=False)
    try:
        model.load_state_dict(safetensors.torch.load_file(path / WEIGHTS), strict=True)
    except (RuntimeError, OSError, safetensors.SafetensorError) as e:
        raise ValueError(f"export {path}: {path / WEIGHTS} does not fit {cfg['architecture']} "
                         f"{cfg.get('model_args', {})}: {e}") from e
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------- writing
def export_config(arch: str, backbone: nn.Module, train_cfg: dict, meta: dict) -> dict:
    """config.json in the layout timm reads from a hub repo (`timm.models.load_model_config_from_path`)."""
    spec = train_cfg["spec"]
    name, model_args = timm_args(arch, train_cfg.get("patch_size"), spec["global_size"])
    default_cfg = backbone.pretrained_cfg  # timm's own card for this architecture: stem and head names
    size = spec["global_size"]
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": backbone.num_features,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": False,  # ViTs here interpolate their position embedding (dynamic_img_size)
            "interpolation": INTERPOLATION,
            "crop_pct": CROP_PCT,
            "crop_mode": "center",
            "mean": list(spec["mean"]),
            "std": list(spec["std"]),
            "num_classes": 0,
            "first_conv": default_cfg.get("first_conv"),
            "classifier": default_cfg.get("classifier"),
        },
        "lejepa": meta,
    }


def _kshot_section(run_dir: Path, step: int) -> str:
    """The run's k-shot table (kshot.md as written by evaluation/kshot.py, else the rows of kshot.json)."""
    md, js = run_dir / "kshot.md", run_dir / "kshot.json"
    if md.is_file():
        table = md.read_text().strip()
    elif js.is_file():
        try:
            rows = json.loads(js.read_text())
            lines = ["| dataset | shots | model | accuracy % |", "|---|---|---|---:|"]
            lines += [f"| {r['dataset']} | {r['shots']} | {r['model']} | {r['mean']:.1f} ± {r['std']:.1f} |"
                      for r in rows]
            table = "\n".join(lines)
        except (ValueError, KeyError, TypeError) as e:
            print(f"warning: {js} is not a kshot.py result list ({e}); the model card has no k-shot table",
                  file=sys.stderr)
            return ""
    else:
        return ""
    caveat = "" if f"step {step}" in table else (f"\n\nNote: this table does not name step {step}; it may "
                                                  "describe another checkpoint of the run.")
    return f"\n## k-shot transfer (from `{md.name if md.is_file() else js.name}` of the run)\n\n{table}{caveat}\n"


def model_card(cfg: dict, run_meta: dict, kshot: str) -> str:
    meta, tc = cfg["lejepa"], cfg["lejepa"]["config"]
    spec = tc["spec"]
    args = ", ".join(f"{k}={v!r}" for k, v in cfg["model_args"].items())
    world = run_meta.get("world_size", meta.get("world_size", 1))
    accum = tc.get("accum_steps", 1)
    total = run_meta.get("total_steps") or tc.get("steps") or (f"{tc['epochs']} epochs" if tc.get("epochs") else "?")
    data = run_meta.get("data", tc.get("data")) or "embedded Fashion-MNIST (pipelines.embedded)"
    locals_ = (f"{spec['local_views']} × {spec['local_size']} px local (scale {spec['local_scale'][0]}–"
               f"{spec['local_scale'][1]})" if spec["local_views"] else "no local views")
    return f"""---
library_name: timm
pipeline_tag: image-feature-extraction
tags: [timm, image-feature-extraction, self-supervised, lejepa]
---
# {meta['arch']} LeJEPA, step {meta['step']}

A {meta['arch']} backbone (timm `{cfg['architecture']}`, {cfg['num_features']}-d features) pretrained without
labels with LeJEPA ([arXiv 2511.08544](https://arxiv.org/abs/2511.08544)): every view predicts the embedding
centre of the global views, plus λ·SIGReg. This folder holds the backbone only (no projector, no classifier).

## Recipe

| | |
|---|---|
| architecture | `{meta['arch']}` = timm `{cfg['architecture']}` ({args}) |
| views | {spec['global_views']} × {spec['global_size']} px global (scale {spec['global_scale'][0]}–{spec['global_scale'][1]}), {locals_} |
| λ (SIGReg weight) | {tc['lambd']} ({tc['num_slices']} slices) |
| steps | {meta['step']} of {total} |
| batch | {tc['batch_size']} per rank × {world} rank(s) × {accum} accumulation = {tc['batch_size'] * world * accum} |
| optimizer | AdamW, peak lr {tc['lr']}, weight decay {tc.get('weight_decay') if tc.get('weight_decay') is not None else 'default'}, warmup {tc.get('warmup') if tc.get('warmup') is not None else '10 %'}, cosine |
| data | `{data}` |
| preset | {tc.get('preset')} |
| code version | `{meta['code_version']}` |

## Load

```python
import timm, torch
model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # or "hf-hub:USER/REPO"
model.eval()
cfg = timm.data.resolve_data_config({{}}, model=model)  # {spec['global_size']} px, mean/std of pretraining
transform = timm.data.create_transform(**cfg)
features = model(transform(image).unsqueeze(0))  # pooled features [1, {cfg['num_features']}]
```

Without `config.json`: `timm.create_model("{cfg['architecture']}", pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file="model.safetensors"), {args})`.

Linear probes in this project (`--probe {DEFAULT_PROBE}`) read, for a ViT, the CLS tokens of the last two
blocks concatenated and LayerNorm-ed: `model.get_intermediate_layers(x, n=2, return_prefix_tokens=True,
norm=False)`; for other networks the pooled features above.
{kshot}
Exported from `{meta['source']}`.
"""


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the export folder `out` from a checkpoint file or a run dir (its latest readable checkpoint).

    Errors name the path: no readable checkpoint (FileNotFoundError / ValueError from models.checkpoint),
    an unknown arch, an `out` that exists and is not an empty folder (FileExistsError). Nothing is left
    behind on failure.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new path")
    ckpt = load_checkpoint(checkpoint)
    encoder, train_cfg = encoder_from_checkpoint(ckpt)
    backbone = encoder.backbone
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    run_meta = {}
    if (run_dir / "config.yaml").is_file():  # the trainer's resolved config: total steps, data, world size
        run_meta = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    meta = {"format": EXPORT_FORMAT, "arch": train_cfg["arch"], "patch_size": train_cfg.get("patch_size"),
            "step": ckpt["step"], "world_size": ckpt.get("world_size", 1),
            "code_version": ckpt.get("code_version", "unknown"), "source": str(ckpt.get("path", checkpoint)),
            "config": train_cfg}
    cfg = export_config(train_cfg["arch"], backbone, train_cfg, meta)
    tensors = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    card = model_card(cfg, run_meta, _kshot_section(run_dir, ckpt["step"]))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write(tmp / WEIGHTS, safetensors.torch.save(tensors, metadata={"format": "pt"}))
        _write(tmp / CONFIG, (json.dumps(cfg, indent=2) + "\n").encode())
        _write(tmp / CARD, card.encode())
        _fsync_dir(tmp)
        os.replace(tmp, out)  # onto an absent or empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run dir (latest readable checkpoint) or checkpoint file")
    parser.add_argument("--out", required=True, help="folder to create (absent or empty)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    cfg = json.loads((out / CONFIG).read_text())
    print(f"wrote {out}: {WEIGHTS} ({cfg['architecture']}, step {cfg['lejepa']['step']}), {CONFIG}, {CARD}\n"
          f"load: timm.create_model('local-dir:{out.resolve()}', pretrained=True)")
    return out


if __name__ == "__main__":
    main()
