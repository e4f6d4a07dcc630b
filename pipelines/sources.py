"""Image sources shared by every backend: scanning, the epoch order, and tolerant decoding.

A `Source` is a list of samples (files of an ImageFolder tree, or members of webdataset tar shards) with
integer labels. `epoch_batches` is the one function that decides which samples a rank sees in which step,
so every backend shuffles, shards and resumes identically. `decode_rgb` / `check_encoded` make odd files
(grey, CMYK, RGBA, 16-bit PNG) into plain RGB and turn broken ones (zero-byte, truncated, not an image)
into a `BadImage` that the backends count and replace instead of crashing mid-epoch.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import re
import sys
import tarfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.images import IMAGE_EXTS

log = logging.getLogger(__name__)

LABEL_EXTS = ("cls", "class", "label")  # webdataset members holding an integer label


class BadImage(ValueError):
    """A sample whose bytes cannot be decoded into an RGB image."""


@dataclass
class Source:
    """Samples of one dataset. `members[i]` is a file path (folder) or (tar path, offset, size) (webdataset)."""

    root: str
    kind: str  # "folder" | "webdataset"
    members: list
    labels: np.ndarray  # int64 [N]; -1 where unlabelled
    classes: list[str]
    _handles: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def name(self, i: int) -> str:
        m = self.members[i]
        return m if self.kind == "folder" else f"{m[0]}@{m[1]}"

    def read(self, i: int) -> bytes:
        """Raw encoded bytes of sample `i` (a tar member is read with one seek, the shard kept open)."""
        m = self.members[i]
        if self.kind == "folder":
            with open(m, "rb") as f:
                return f.read()
        path, offset, size = m
        # One handle per (process, thread, shard): DataLoader workers and DALI callbacks must not share.
        key = (os.getpid(), threading.get_ident(), path)
        f = self._handles.get(key)
        if f is None:
            f = self._handles[key] = open(path, "rb")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self):  # open file handles do not travel to worker processes
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def expand_braces(pattern: str) -> list[str]:
    """webdataset shard patterns: `a-{000..009}.tar` (zero-padded range) and `{x,y}` alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(k).zfill(width) for k in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def open_source(source: str | os.PathLike) -> Source:
    """Scan `source`: an ImageFolder directory (class = sub-folder, sorted), a webdataset `.tar`, a
    directory of `.tar` shards, or a brace pattern of shards. Raises ValueError naming the path when it
    is missing, empty, or holds no images."""
    text = str(source)
    if "{" in text:
        shards = expand_braces(text)
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise ValueError(f"data source {text!r}: shard(s) not found: {missing[:3]}")
        return _scan_tars(text, shards)
    path = Path(text)
    if not path.exists():
        raise ValueError(f"data source {text!r} does not exist")
    if path.is_file():
        if path.suffix != ".tar":
            raise ValueError(f"data source {text!r} is a file but not a .tar shard (or an ImageFolder dir)")
        return _scan_tars(text, [str(path)])
    tars = sorted(str(p) for p in path.glob("*.tar"))
    if tars:
        return _scan_tars(text, tars)
    return _scan_folder(path)


def _scan_folder(root: Path) -> Source:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data source {str(root)!r}: no class sub-folders (expected ROOT/<class>/<image>)")
    members, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTS) and not fn.startswith("."):
                    members.append(os.path.join(dirpath, fn))
                    labels.append(label)
    if not members:
        raise ValueError(f"data source {str(root)!r}: no image files ({', '.join(IMAGE_EXTS)}) under {classes}")
    return Source(str(root), "folder", members, np.asarray(labels, np.int64), classes)


def _scan_tars(name: str, shards: list[str]) -> Source:
    members, labels = [], []
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    # webdataset key: the path up to the first dot of the basename
                    key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    ext = base.split(".", 1)[1].lower()
                    entry = samples.setdefault(key, {})
                    if "." + ext in IMAGE_EXTS and "image" not in entry:
                        entry["image"] = (shard, m.offset_data, m.size)
                    elif ext in LABEL_EXTS:
                        tf.fileobj.seek(m.offset_data)
                        entry["label"] = tf.fileobj.read(m.size)
        except tarfile.TarError as e:
            raise ValueError(f"data source {name!r}: {shard} is not a readable tar ({e})") from e
        for key, entry in samples.items():
            if "image" in entry:
                members.append(entry["image"])
                try:
                    labels.append(int(entry.get("label", b"-1").strip() or -1))
                except ValueError:
                    labels.append(-1)
    if not members:
        raise ValueError(f"data source {name!r}: no image members ({', '.join(IMAGE_EXTS)}) in {len(shards)} shard(s)")
    labels_np = np.asarray(labels, np.int64)
    n_classes = int(labels_np.max()) + 1 if labels_np.max() >= 0 else 0
    return Source(name, "webdataset", members, labels_np, [str(k) for k in range(n_classes)])


# ---------------------------------------------------------------------------------------------------
# The epoch order: one pure function, used by every backend.


def worker_start_method() -> str | None:
    """How decode worker processes start: the platform's default (fork) unless DALI's native thread pools run
    in this process (forking them can deadlock the child), then a clean forkserver."""
    return "forkserver" if "nvidia.dali" in sys.modules else None


def steps_per_epoch(n: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    per_step = batch_size * world_size
    return n // per_step if drop_last else -(-n // per_step)


def check_sharding(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool = True) -> None:
    """ValueError unless `rank` of `world_size` ranks can run at least one step of `batch_size` of n."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    if steps_per_epoch(n, batch_size, world_size, drop_last) == 0:
        raise ValueError(f"{n} samples < one global batch ({batch_size} x {world_size} ranks) with drop_last")


def epoch_batches(
    n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
    start_step: int = 0, shuffle: bool = True, drop_last: bool = True, order: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Sample indices of each step this rank runs in `epoch`, from `start_step` on.

    The permutation depends only on (seed, epoch), or is `order` when the caller brings its own (FFCV's
    page-local shuffle). Step s of the epoch uses the global slice perm[s*B*W : (s+1)*B*W], split into W
    contiguous per-rank batches, so ranks are disjoint, every rank runs the same number of full batches
    (drop_last), and resuming at `start_step` is the tail of the same list. Without drop_last the last,
    short global step is split round-robin (eval only).
    """
    check_sharding(n, batch_size, rank, world_size, drop_last)
    if order is None:
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    elif len(order) != n:
        raise ValueError(f"order has {len(order)} entries for {n} samples")
    per_step = batch_size * world_size
    full = n // per_step
    batches = [order[s * per_step + rank * batch_size: s * per_step + (rank + 1) * batch_size] for s in range(full)]
    if not drop_last and full * per_step < n:
        tail = order[full * per_step:][rank::world_size]
        if len(tail):
            batches.append(tail)
    return batches[start_step:]


# ---------------------------------------------------------------------------------------------------
# Tolerant decoding.


MAX_REPLACEMENTS = 16  # consecutive unreadable samples before the source counts as broken


def read_replacing_bad(source: Source, index: int, decode, on_bad):
    """`decode(bytes, name)` of sample `index`, or, when its file is unreadable (BadImage, OSError), of the
    first readable sample after it (cyclically); `on_bad(name, reason)` hears of each bad file met. A long
    run needs a counted, logged skip, not a crash. Returns (decoded, index of the sample used)."""
    for k in range(MAX_REPLACEMENTS):
        i = (index + k) % len(source)
        try:
            return decode(source.read(i), source.name(i)), i
        except (BadImage, OSError) as e:
            on_bad(source.name(i), str(e))
    raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable images in {source.root!r} from sample {index}")


def decode_batch_replacing_bad(items: list[tuple[bytes, str]], decode, on_bad) -> tuple[list, list[int]]:
    """`decode(bytes, name)` of each (bytes, name) of a streamed batch. A sample that does not decode
    (BadImage) is replaced by the next decodable one of the same batch, cyclically, and reported to
    `on_bad(name, reason)`: the batch stays the stream's batch, so the checkpointed position stays exact.
    Returns (decoded value per slot, index of the sample each slot shows); RuntimeError when none decodes."""
    decoded, bad = [], set()
    for i, (data, name) in enumerate(items):
        try:
            decoded.append(decode(data, name))
        except BadImage as e:
            decoded.append(None)
            bad.add(i)
            on_bad(name, str(e))
    good = [i for i in range(len(items)) if i not in bad]
    if not good:
        raise RuntimeError(f"no image of a streamed batch of {len(items)} decodes (first: {items[0][1]})")
    used = [i if i not in bad else min((j for j in good if j > i), default=good[0]) for i in range(len(items))]
    return [decoded[u] for u in used], used


class BadFileLog:
    """Counts replaced samples and logs each bad path once (per process that owns the log)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, name: str, why: str) -> None:
        if name not in self.counts:
            log.warning("skipping unreadable image %s (%s); replaced by another sample", name, why)
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _to_rgb(img) -> "PIL.Image.Image":  # noqa: F821
    """Grey, palette, CMYK, RGBA, 16-bit -> 8-bit RGB (alpha dropped; 16-bit scaled, not clipped)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 or img.mode != "I" else 1.0
        img = Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_pil(data: bytes, name: str = "<bytes>") -> "PIL.Image.Image":  # noqa: F821
    """Decode to an RGB PIL image (libjpeg-turbo), converting odd modes; BadImage if impossible."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(f"{name}: zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays False)
        return _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{name}: {type(e).__name__}: {e}") from e


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode to a writable HWC uint8 RGB array (see `decode_pil`)."""
    return np.array(decode_pil(data, name))


_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = (0xC0, 0xC1, 0xC2)  # frame headers of Huffman baseline, extended and progressive JPEGs


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an 8-bit grey or 3-channel Huffman (baseline or progressive) JPEG, read from its
    frame header by walking the markers (a few us, a third of PIL's header parse); None for anything else,
    which `check_encoded` then hands to PIL."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        elif marker in _JPEG_SOF:
            precision, components = data[i + 4], data[i + 9]
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return (h, w) if precision == 8 and components in (1, 3) and h > 0 and w > 0 else None
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return None  # another coding (lossless, arithmetic), or scan data before any frame header
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def check_encoded(data: bytes, name: str = "<bytes>") -> tuple[bytes, int, int]:
    """For backends that decode themselves (DALI): return (bytes a plain RGB decoder accepts, height,
    width). Baseline/progressive 8-bit RGB or grey JPEG and 8-bit RGB/grey PNG pass through untouched
    (header parse only: ~8 us for a JPEG, ~30 us with PIL for the rest); anything else (CMYK, RGBA, 16-bit, other formats) is decoded by PIL,
    converted to RGB and re-encoded losslessly as PNG; broken files raise BadImage. A JPEG/PNG missing
    its end marker is treated as truncated and fully decoded to find out."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(f"{name}: zero-byte file")
    if data.startswith(_JPEG_SOI) and data[-4096:].rstrip(b"\x00").endswith(_JPEG_EOI):
        size = _plain_jpeg_size(data)  # the common case, without PIL (the DALI feed's largest cost)
        if size is not None:
            return data, size[0], size[1]
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format, img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{name}: {type(e).__name__}: {e}") from e
    if fmt == "JPEG":
        complete = data[-4096:].rstrip(b"\x00").endswith(_JPEG_EOI)  # some writers pad with zeros
        plain = mode in ("RGB", "L")
    elif fmt == "PNG":
        complete = b"IEND" in data[-32:]
        plain = mode in ("RGB", "L") and _png_bit_depth(data) == 8
    else:
        complete, plain = False, False
    if complete and plain:
        return data, h, w
    rgb = decode_rgb(data, name)  # raises BadImage when truly broken
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), rgb.shape[0], rgb.shape[1]


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 25 and data.startswith(_PNG_SIG) else 0


class ShardedLoader:
    """State every backend's loader shares (the protocol in pipelines/__init__.py): the source, this rank's
    shard, the epoch and the resume point. `source` is a path (opened with `open_source`) or an object with
    `len()`, `root` and `num_classes` (a `Source`, FFCV's .beton). Subclasses implement `__iter__` over
    `next_pass()`, and may bring their own epoch order (`epoch_order`)."""

    def __init__(self, source, spec, batch_size: int, device, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, drop_last: bool = True):
        self.source = open_source(source) if isinstance(source, (str, os.PathLike)) else source
        self.spec, self.batch_size, self.device = spec, batch_size, device
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.bad_files = BadFileLog()
        try:  # before any work starts
            check_sharding(len(self.source), batch_size, rank, world_size, drop_last)
        except ValueError as e:
            raise ValueError(f"data source {self.source.root!r}: {e}") from None
        self.epoch, self.start_step = int(epoch), 0

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def __len__(self) -> int:
        return steps_per_epoch(len(self.source), self.batch_size, self.world_size, self.drop_last)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step={start_step} outside the epoch's {len(self)} steps")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def epoch_order(self, epoch: int) -> np.ndarray | None:
        """The epoch's permutation of the samples; None: `epoch_batches`' seeded shuffle."""
        return None

    def epoch_batches(self, epoch: int, start_step: int = 0) -> list[np.ndarray]:
        """This rank's sample indices per step of `epoch` (a pure function of seed, epoch, rank, world)."""
        return epoch_batches(len(self.source), self.batch_size, self.rank, self.world_size, self.seed, epoch,
                             start_step, drop_last=self.drop_last, order=self.epoch_order(epoch))

    def next_pass(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch from the resume point; the resume point applies to
        one pass only."""
        batches = self.epoch_batches(self.epoch, self.start_step)
        self.start_step = 0
        return batches

    def counters(self) -> dict[str, int]:
        """Cumulative fault counters of this process, by TensorBoard tag (the trainer sums them over ranks)."""
        return {"data/bad_samples": self.bad_files.total}


class StreamedLoader:
    """The streamed counterpart of `ShardedLoader`: the Loader protocol (pipelines/__init__.py) around one
    rank's `pipelines.streaming.ShardStream`, which owns the shard order, the epoch length and the
    position. A backend subclass implements `__iter__`: it takes lists of `StreamSample`s from
    `next_pass()` (reading ahead is fine) and calls `delivered()` as it hands each batch to the trainer, so
    `state_dict()` is the position after the last batch the trainer took, not after the last one read.

    Resume: `load_state_dict(state)` then `set_epoch(epoch, step)` (what trainer/checkpointing.restore and
    the trainer do) continue exactly. Without a usable state (None: a checkpoint of another world size, or
    one of other stream settings or another shard list) `set_epoch(epoch, step)` warns and continues at the
    same fraction of the epoch in each reader's shard list (`ShardStream.approximate_state`): not exact,
    as the indexed sources on another world size."""

    def __init__(self, stream, spec, device):
        self.stream, self.spec, self.device = stream, spec, device
        self.batch_size, self.rank, self.world_size, self.seed = (stream.batch_size, stream.rank, stream.world_size,
                                                                  stream.seed)
        self.bad_files = BadFileLog()  # samples whose bytes did not decode (replaced within their batch)
        self.epoch, self.start_step = stream.epoch, 0
        self._pending: collections.deque = collections.deque()  # positions of batches read, not yet delivered
        self._position = stream.state_dict()  # after the last batch delivered
        self._loaded: tuple[int, int] | None = None  # (epoch, step) of a position loaded from a checkpoint
        self._unusable = "no stream position in the checkpoint"
        self._carried: dict[str, int] = {}  # counters of the run before the resume

    @property
    def source(self):
        return self.stream.source

    @property
    def num_classes(self) -> int:
        return self.stream.num_classes

    def __len__(self) -> int:
        return len(self.stream)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step={start_step} outside the epoch's {len(self)} steps")
        if start_step == 0:
            self.stream.set_epoch(epoch)
        elif self._loaded != (epoch, start_step):
            warnings.warn(f"streamed source {self.source.pattern!r}: {self._unusable}; continuing epoch {epoch} at "
                          f"step {start_step} from the same fraction of each reader's shards (not exact)")
            self.stream.load_state_dict(self.stream.approximate_state(epoch, start_step * self.batch_size))
        self._loaded = None
        self.epoch, self.start_step = int(epoch), int(start_step)
        self._position = self.stream.state_dict()
        self._pending.clear()

    def state_dict(self) -> dict:
        """{"stream": the stream position after the last batch delivered, "counters": counters()}: ints,
        lists and a str-keyed dict (loads with torch.load(weights_only=True))."""
        return {"stream": self._position, "counters": self.counters()}

    def load_state_dict(self, state: dict | None) -> None:
        """The position of a checkpoint for the next `set_epoch(epoch, step)`; None (a checkpoint of
        another world size) or a state of another configuration makes that resume approximate."""
        self._loaded = None
        if state is None:
            self._unusable = "the checkpoint holds no position for this world size"
            return
        self._carried = {k: int(v) for k, v in state.get("counters", {}).items()}
        try:
            self.stream.load_state_dict(state["stream"])
        except (ValueError, KeyError) as e:
            self._unusable = f"the checkpoint's stream position does not apply ({e})"
            return
        self._loaded = int(state["stream"]["epoch"]), int(state["stream"]["emitted"]) // self.batch_size

    def next_pass(self):
        """Lists of `batch_size` StreamSamples for the rest of the current pass (from the resume point,
        which applies to one pass), each position kept until the backend calls `delivered()`."""
        self.epoch, self.start_step = self.stream.epoch, 0
        self._pending.clear()
        for samples, position in self.stream.batches():
            self._pending.append(position)
            yield samples

    def delivered(self) -> None:
        """The next batch read (in order) has reached the trainer: it is what a checkpoint now covers."""
        self._position = self._pending.popleft()

    def counters(self) -> dict[str, int]:
        """Cumulative over the run (carried through checkpoints): shards skipped after their retries,
        retries, laps (a rank reading its shards again to fill its epoch), samples skipped or replaced
        (no image member, or bytes that do not decode). A shard read ahead of the position a checkpoint
        holds may count again after a resume."""
        stats = self.stream.stats
        now = {"data/skipped_shards": stats.shards_skipped, "data/shard_retries": stats.retries,
               "data/laps": stats.laps, "data/bad_samples": self.stream.bad_samples.total + self.bad_files.total}
        return {k: v + self._carried.get(k, 0) for k, v in now.items()}

    def close(self) -> None:
        """Stop reading: the stream's reader threads end and `pipe:` commands are killed."""
        self.stream.close()
