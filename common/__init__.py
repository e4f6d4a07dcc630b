"""Small pieces every stage shares (a leaf: imports nothing from this project).

- `common.io`: `atomic_open` (temp file + fsync + rename), `fsync_dir`.
- `common.images`: `IMAGE_EXTS`, `IMAGENET_MEAN` / `IMAGENET_STD`.
"""
