"""Streamed webdataset shards: local files, `http(s)://` URLs and `pipe:COMMAND`, read front to back.

Nothing is scanned before training. A `StreamSource` is the expanded shard list (plus per-shard sample
counts when an index file or `samples_per_shard` gives them); a `ShardStream` is one rank's stream of
samples for an epoch:

- **Order.** Each epoch the shards are permuted from (seed, epoch); rank r takes every world_size-th shard
  of that permutation, and splits its shards over `readers` readers (w takes every readers-th). The
  readers stream their shards in order (each may prefetch on a thread) and the rank takes their samples
  round robin. That input sequence passes through a *block shuffle buffer*: the input is cut into blocks
  of `shuffle_buffer` samples and each block is emitted in a permutation drawn from (seed, epoch, rank,
  block). Unlike a rolling buffer, whose content can be arbitrarily old, a block never holds a sample
  read more than `shuffle_buffer` samples ago, so a resume re-reads at most one block (see Position).
  With shards written in a shuffled order (pipelines/write_shards.py does) a block of a few thousand
  samples from `readers` shards mixes classes well.
- **Epoch length.** Every rank emits exactly `steps_per_epoch * batch_size` samples, with no
  communication: steps_per_epoch = floor(S / batch_size) where S is the sum of the floor(n_shards /
  world_size) *smallest* per-shard counts, which no rank's share of shards can fall below in any epoch
  (so the length does not change between epochs either). Counts come from `samples_per_shard` (exact or
  an estimate), else the shard writer's index file found beside the shards, else they are estimated
  once by counting the samples of the first readable shard (every rank counts the same shard, so every
  rank agrees; that costs one extra shard read at start-up and is logged). A rank whose shards hold more
  samples leaves the rest for other epochs; one that runs short (a wrong estimate, a skipped shard,
  bad samples) starts over on its own shard list (a "lap": logged, counted, and such repeats get a new
  sample id, so their augmentations differ).
- **Position.** `state_dict()` after any sample is: the block index, how many samples of that block
  were emitted, and where each reader stood when the block started filling (shard cursor, samples and
  byte offset into that shard) plus the round-robin pointer and lap. `load_state_dict()` + iteration
  re-opens each reader's shard at that byte offset (a seek, an HTTP Range request, or a `pipe:` re-run
  that discards the bytes), refills that one block, redraws its permutation and skips what was emitted:
  the rest of the epoch is exactly the uninterrupted one's.
- **Faults.** A shard that cannot be opened or breaks mid-way (HTTP error, connection reset, read
  timeout, command exiting non-zero, corrupt tar) is retried `retries` times with exponential backoff,
  each retry starting at the first sample not yet delivered (never a duplicate), then skipped with one
  logged line naming the URL or command (`stats.shards_skipped`; a later lap of the same pass does not
  try it again). A key without an image member is a bad sample, skipped and counted (`bad_samples`,
  logged once). Reads time out (`timeout` seconds). Resume equality assumes failures that persist: a
  shard that failed before a kill and reads fine after it gives the resumed run more samples.
- **Start-up.** Opening a source expands the pattern, reads the index file and the first shard's header
  (a clear error when nothing can be read). The first sample waits for one shuffle block; the readers
  then stay at most `prefetch` samples ahead. Nothing depends on the number of shards beyond
  expanding and permuting their names.

A pass is consumed from one thread (the readers' prefetch threads are internal); `close()` it from that
thread, or let it end.

Sample keys follow webdataset: a member's key is its path up to the first dot of its basename,
consecutive members with the same key form one sample; the image is the first member with an image
extension, the label an integer in a `.cls`/`.class`/`.label` member (-1 when absent). Only uncompressed
tar shards are read.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import logging
import os
import queue
import re
import select
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from pipelines.sources import IMAGE_EXTS, LABEL_EXTS, BadFileLog, expand_braces

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https", "file")
INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "lejepa-shards/1"
STATE_VERSION = 1
_READ_ERRORS = (OSError, tarfile.TarError, http.client.HTTPException, EOFError)


class ShardError(OSError):
    """A shard that cannot be opened or read; the message names the URL or command."""


# ---------------------------------------------------------------------------------------------------
# Shard lists


def is_remote(source: str | os.PathLike) -> bool:
    """URLs and `pipe:` commands are always streamed; local shards only on request (`--stream`)."""
    text = str(source)
    return text.startswith("pipe:") or re.match(r"https?://", text, re.IGNORECASE) is not None


def expand_shards(pattern: str | os.PathLike) -> list[str]:
    """Shard URLs of `pattern`: brace expansion (`train-{000000..004095}.tar`, `{a,b}`) of a local path,
    `file://`/`http(s)://` URL or `pipe:COMMAND`; a local directory means its `*.tar` files. Raises
    ValueError naming the pattern for an unknown scheme or an empty expansion. Reads nothing remote."""
    text = str(pattern)
    if text.startswith("pipe:"):
        if not text[5:].strip():
            raise ValueError(f"data source {text!r}: `pipe:` needs a command that writes a tar to stdout")
    else:
        m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", text)
        if m and m.group(1).lower() not in URL_SCHEMES:
            raise ValueError(
                f"data source {text!r}: unknown scheme {m.group(1)!r}; use http://, https://, file://, a local "
                f"path, or pipe:COMMAND (e.g. 'pipe:aws s3 cp s3://bucket/train-{{000000..000099}}.tar -')")
    if "{" not in text and not text.startswith("pipe:") and Path(_local_path(text)).is_dir():
        shards = sorted(str(p) for p in Path(_local_path(text)).glob("*.tar"))
        if not shards:
            raise ValueError(f"data source {text!r}: a directory without .tar shards")
        return shards
    shards = expand_braces(text)
    if not shards:
        raise ValueError(f"data source {text!r}: the pattern expands to zero shards")
    return shards


def _local_path(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url


def shard_name(url: str) -> str:
    """The shard's file name (the index's key): the basename of the path, or for a `pipe:` command of its
    last word containing `.tar`."""
    if url.startswith("pipe:"):
        words = url[5:].split()
        path = ([w for w in words if ".tar" in w] or words)[-1]
    elif "://" in url:
        path = urllib.parse.urlparse(url).path
    else:
        path = url
    return path.split("?", 1)[0].rsplit("/", 1)[-1]


def index_name(prefix: str) -> str:
    """File name of the index written beside shards whose names start with `prefix` ("train-" ->
    "train.index.json"). pipelines/write_shards.py writes it; `index_url` finds it."""
    return (prefix.rstrip("-_.") or "shards") + INDEX_SUFFIX


def index_url(pattern: str) -> str | None:
    """Where the writer's index of `pattern` would be: the word holding the first brace group replaced by
    its index name (`http://h/d/train-{0..9}.tar` -> `http://h/d/train.index.json`, and
    `pipe:cat d/train-{0..9}.tar` -> `pipe:cat d/train.index.json`); for a directory, its one
    `*.index.json`."""
    brace = pattern.find("{")
    if brace < 0:
        path = Path(_local_path(pattern))
        if not pattern.startswith("pipe:") and path.is_dir():
            found = sorted(path.glob("*" + INDEX_SUFFIX))
            return str(found[0]) if len(found) == 1 else None
        return None
    start = max(pattern.rfind(c, 0, brace) for c in "/ \t:") + 1
    end = re.compile(r"\s").search(pattern, brace)
    end = end.start() if end else len(pattern)
    return pattern[:start] + index_name(pattern[start:brace]) + pattern[end:]


# ---------------------------------------------------------------------------------------------------
# Opening a shard at a byte offset


def open_shard(url: str, offset: int = 0, timeout: float = 60.0):
    """A readable binary stream of shard `url` from byte `offset`: a local file (seek), an HTTP(S) GET
    (a Range request; a server that ignores it has the skipped bytes read and dropped) or a `pipe:`
    command run by the shell (its output before `offset` dropped). Raises ShardError naming the URL.
    Remote reads raise ShardError after `timeout` seconds without data, a connection closed before
    Content-Length bytes, or a command exiting non-zero (with its last stderr line)."""
    if url.startswith("pipe:"):
        return _PipeReader(url, offset, timeout)
    if re.match(r"https?://", url, re.IGNORECASE):
        return _HTTPReader(url, offset, timeout)
    path = _local_path(url)
    try:
        f = open(path, "rb")
        f.seek(offset)
        return f
    except OSError as e:
        raise ShardError(f"{url}: {e.strerror or e}") from e


def _discard(reader, n: int, url: str) -> None:
    while n > 0:
        chunk = reader.read(min(n, 1 << 20))
        if not chunk:
            raise ShardError(f"{url}: ends before byte {n} of the resume offset")
        n -= len(chunk)


class _HTTPReader:
    def __init__(self, url: str, offset: int, timeout: float):
        self.url = url
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            self.resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            raise ShardError(f"{url}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise ShardError(f"{url}: {e.reason}") from e
        except (OSError, http.client.HTTPException) as e:
            raise ShardError(f"{url}: {type(e).__name__}: {e}") from e
        length = self.resp.headers.get("Content-Length")
        self.remaining = int(length) if length is not None else None
        if offset and self.resp.status == 206:
            got = re.match(r"bytes (\d+)-", self.resp.headers.get("Content-Range", ""))
            if not got or int(got.group(1)) != offset:
                self.close()
                raise ShardError(f"{url}: asked for bytes {offset}- and got {self.resp.headers.get('Content-Range')!r}")
        elif offset:
            _discard(self, offset, url)

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.resp.read(n) if n >= 0 else self.resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ShardError(f"{self.url}: {type(e).__name__}: {e}") from e
        if self.remaining is not None:
            self.remaining -= len(data)
            # http.client returns b"" when the server closes early: a silent short shard otherwise
            if not data and n != 0 and self.remaining > 0:
                raise ShardError(f"{self.url}: connection closed with {self.remaining} bytes still to come")
        return data

    def close(self) -> None:
        self.resp.close()


class _PipeReader:
    def __init__(self, url: str, offset: int, timeout: float):
        self.url, self.timeout = url, timeout
        self.buf, self.eof = bytearray(), False
        self.stderr = tempfile.TemporaryFile()
        try:
            # own process group: closing early kills the whole command (e.g. the shell and its child)
            self.proc = subprocess.Popen(url[5:], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self.stderr, bufsize=0, start_new_session=True)
        except OSError as e:
            self.stderr.close()
            raise ShardError(f"{url}: {e}") from e
        self.fd = self.proc.stdout.fileno()
        if offset:
            _discard(self, offset, url)

    def read(self, n: int = -1) -> bytes:
        """n bytes (fewer only at the end), waiting at most `timeout` seconds for each chunk."""
        n = 1 << 20 if n < 0 else n
        while len(self.buf) < n and not self.eof:
            if not select.select([self.fd], [], [], self.timeout)[0]:
                raise ShardError(f"{self.url}: no data for {self.timeout:g} s")
            chunk = os.read(self.fd, 1 << 20)
            if chunk:
                self.buf += chunk
                continue
            self.eof = True
            try:
                code = self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                raise ShardError(f"{self.url}: closed its output but did not exit within {self.timeout:g} s")
            if code != 0:
                raise ShardError(f"{self.url}: exited with status {code}{self._stderr_tail()}")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = [ln.strip() for ln in self.stderr.read()[-4096:].decode(errors="replace").splitlines() if ln.strip()]
        return f": {lines[-1][:300]}" if lines else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this reader started (start_new_session)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


# ---------------------------------------------------------------------------------------------------
# Tar members -> samples


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header(block: bytes, offset: int) -> tuple[bytes, int, bytes]:
    """(type flag, data size, name field) of a tar header block; tarfile.ReadError when its checksum is wrong
    (not a tar, or a resume at the wrong offset)."""
    try:
        if _number(block[148:156]) == sum(block[:148]) + 256 + sum(block[156:]):  # checksum field as spaces
            name = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\x00" and block[345] != 0:  # POSIX ustar: prefix/name
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            return block[156:157], _number(block[124:136]), name
    except ValueError:
        pass
    raise tarfile.ReadError(f"bad tar header at byte {offset}")


def _skip(f, n: int) -> None:
    while n:  # a stream cannot seek: read and drop
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise tarfile.ReadError("unexpected end of data")
        n -= len(chunk)


_ZERO_BLOCK = bytes(512)


def _pax_path(records: bytes) -> bytes | None:
    path, pos = None, 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        length = int(records[pos:space])
        key, _, value = records[space + 1: pos + length - 1].partition(b"=")
        if key == b"path":
            path = value
        pos += length
    return path


class Group(NamedTuple):
    key: str
    members: dict  # extension -> bytes, image and label members only
    start: int  # byte offset of the group's first header in the shard
    end: int | None  # byte offset where the next group starts; None for the shard's last group


def _key_ext(name: str) -> tuple[str, str] | None:
    """webdataset: key = the path up to the first dot of the basename, extension = the rest (lower case)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


_REGULAR = (b"0", b"\0", b"7")


def iter_groups(f, base: int = 0) -> Iterator[Group]:
    """Consecutive tar members sharing a webdataset key, read sequentially from `f` (positioned at a header
    at byte `base` of the shard); only image and label members' data is kept. A group is yielded as soon as
    the next group's first header (or the end-of-archive block) has been read, so its `end` is known and a
    resume at `end` starts a clean sample. Parses ustar, GNU long names and pax `path` records (~3x fewer
    Python calls per member than `tarfile` in stream mode); raises tarfile.ReadError for a bad header or a
    stream that ends before the end-of-archive block: a truncated shard is an error, never a short one."""
    offset, start, long_name = base, None, None
    key, members, group_start = None, {}, base
    while True:
        block = _read_exact(f, 512)
        if len(block) < 512:
            raise tarfile.ReadError(f"unexpected end of data at byte {offset} (no end-of-archive block)")
        if block == _ZERO_BLOCK:
            break
        kind, size, name = _header(block, offset)
        padded = (size + 511) & ~511
        start = offset if start is None else start  # a member starts at its first (extended) header
        offset += 512 + padded
        if kind in (b"L", b"x", b"g"):  # GNU long name, pax extended / global header
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise tarfile.ReadError(f"unexpected end of data at byte {offset - padded + len(data)}")
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0]
            elif kind == b"x":
                long_name = _pax_path(data[:size]) or long_name
            else:
                start = None
            continue
        member_start, start = start, None
        ke = _key_ext((long_name or name).decode("utf-8", "surrogateescape")) if kind in _REGULAR else None
        long_name = None
        if ke is None:
            _skip(f, padded)
            continue
        k, ext = ke
        if k != key:
            if key is not None:
                yield Group(key, members, group_start, member_start)
            key, members, group_start = k, {}, member_start
        if ext not in members and ("." + ext in IMAGE_EXTS or ext in LABEL_EXTS):
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise tarfile.ReadError(f"unexpected end of data in {key}.{ext} at byte {offset - padded}")
            members[ext] = data[:size] if size < padded else data
        else:
            _skip(f, padded)
    if key is not None:
        yield Group(key, members, group_start, None)


def image_and_label(members: dict) -> tuple[bytes | None, int]:
    image = next((v for k, v in members.items() if "." + k in IMAGE_EXTS), None)
    text = next((members[k] for k in LABEL_EXTS if k in members), b"")
    try:
        label = int(text.strip() or -1)
    except ValueError:
        label = -1
    return image, label


SAMPLE_ID_BITS = 40  # = pipelines.params.EPOCH_SHIFT: an id is a valid sample index of the parameter sampler


def sample_id(shard_index: int, key: str, lap: int = 0) -> int:
    """40-bit id of a sample, the same whatever the transport (it keys on the shard's place in the
    pattern, not its URL). It is the sample index of the per-view parameter sampler (pipelines/params.py
    keys on (seed, epoch, index) with 40 bits for the index: a wider id would alias across epochs). A
    sample met again in a later lap of the same epoch gets another id. Two samples share an id (and so
    their random views) with probability ~n^2 / 2^41: about half a pair among a million samples."""
    text = f"{shard_index}/{key}" if lap == 0 else f"{shard_index}/{key}/{lap}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> (64 - SAMPLE_ID_BITS)


# ---------------------------------------------------------------------------------------------------
# Source description: shards, counts, classes


@dataclass
class StreamSource:
    pattern: str
    shards: list[str]
    counts: np.ndarray  # int64 [n_shards]: samples per shard (exact or estimated, see counts_from)
    counts_from: str
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def num_classes(self) -> int:
        """Number of classes when the index names them, else 0 (unknown without reading every shard)."""
        return len(self.classes)


@dataclass(frozen=True)
class StreamOptions:
    """How a loader streams (the trainer's --shuffle-buffer, --shard-retries, --samples-per-shard)."""

    shuffle_buffer: int = 1000
    retries: int = 3
    samples_per_shard: int | None = None
    timeout: float = 60.0
    retry_delay: float = 1.0
    readers: int = 2
    prefetch: int = 64

    def open(self, pattern: str | os.PathLike) -> StreamSource:
        return open_stream_source(pattern, self.samples_per_shard, self.timeout, self.retries, self.retry_delay)

    def stream(self, source: StreamSource, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
               epoch: int = 0) -> "ShardStream":
        return ShardStream(source, batch_size, rank, world_size, seed, epoch, readers=self.readers,
                           shuffle_buffer=self.shuffle_buffer, retries=self.retries, retry_delay=self.retry_delay,
                           timeout=self.timeout, prefetch=self.prefetch)


def check_source(pattern: str | os.PathLike, timeout: float = 60.0) -> list[str]:
    """The launcher's check of a streamed --data before any process starts: the pattern expands (known
    scheme, >= 1 shard) and one of its first shards opens as a tar. Reads one header, not the index."""
    text = str(pattern)
    if text.endswith(".beton"):
        raise ValueError(f"data source {text!r} is an FFCV .beton: it is read locally with random access "
                         "(--backend ffcv), not streamed; stream webdataset tar shards instead")
    shards = expand_shards(text)
    check_readable(text, shards, timeout)
    return shards


def open_stream_source(pattern: str | os.PathLike, samples_per_shard: int | None = None, timeout: float = 60.0,
                       retries: int = 3, retry_delay: float = 1.0) -> StreamSource:
    """Expand `pattern`, find its per-shard sample counts and check that it can be read at all, before
    training: ValueError naming the pattern (and the first shard's error) when its scheme is unknown, it
    expands to nothing, or none of its first shards can be opened (unreachable host, 404, failing
    command). Reads the index file (one small request) and, when no counts are known, counts one shard."""
    text = str(pattern)
    shards = expand_shards(text)
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    first = check_readable(text, shards, timeout)
    index = load_index(text, shards, timeout)
    classes = index[1] if index else []
    if samples_per_shard is not None:
        counts, origin = np.full(len(shards), samples_per_shard, np.int64), "samples_per_shard"
    elif index is not None:
        counts, origin = index[0], f"index {index_url(text)}"
    else:  # count one shard: the same one on every rank, so every rank gets the same epoch length
        url = shards[first]
        n = sum(1 for _ in _read_shard(url, 0, 0, timeout, retries, retry_delay, StreamStats()))
        if n == 0:
            raise ValueError(f"data source {text!r}: no sample could be read from {url} to estimate the epoch length")
        counts, origin = np.full(len(shards), n, np.int64), f"estimated from {url}"
        log.warning("data source %s: no index file (%s) and no samples_per_shard: assuming %d samples per shard, "
                    "as counted in %s (write shards with pipelines/write_shards.py, or give --samples-per-shard)",
                    text, index_url(text), n, url)
    return StreamSource(text, shards, counts, origin, classes)


def load_index(pattern: str, shards: list[str], timeout: float) -> tuple[np.ndarray, list[str]] | None:
    """(counts per shard, class names) from the writer's index beside the shards, or None when there is
    none or it does not list every shard (warned: a stale index must not set the epoch length)."""
    url = index_url(pattern)
    if url is None:
        return None
    try:
        f = open_shard(url, 0, timeout)
        try:
            raw = f.read()
        finally:
            f.close()
    except ShardError as e:
        log.info("no shard index for %s (%s)", pattern, e)
        return None
    try:
        index = json.loads(raw)
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
        by_name = {s["name"]: int(s["samples"]) for s in index["shards"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring shard index %s: not a %s file (%s)", url, INDEX_FORMAT, e)
        return None
    names = [shard_name(s) for s in shards]
    missing = [n for n in names if n not in by_name]
    if missing:
        log.warning("ignoring shard index %s: it does not list %d of the %d shards (e.g. %s)", url, len(missing),
                    len(names), missing[0])
        return None
    return np.asarray([by_name[n] for n in names], np.int64), [str(c) for c in index.get("classes", [])]


def check_readable(pattern: str, shards: list[str], timeout: float, tries: int = 3) -> int:
    """Index of the first of the first `tries` shards that opens and starts with a tar header (one attempt
    each, no backoff); ValueError naming the pattern and the first error when none does."""
    errors = []
    for i, url in enumerate(shards[:tries]):
        f = None
        try:
            f = open_shard(url, 0, timeout)
            block = _read_exact(f, 512)
            if len(block) == 512 and block != _ZERO_BLOCK:
                _header(block, 0)
                return i
            errors.append(f"{url}: not a tar (or an empty one)")
        except _READ_ERRORS as e:
            errors.append(str(e) if isinstance(e, ShardError) else f"{url}: {type(e).__name__}: {e}")
        finally:
            if f is not None:
                f.close()
    raise ValueError(f"data source {pattern!r}: cannot read any of its first {len(errors)} shard(s): {errors[0]}")


# ---------------------------------------------------------------------------------------------------
# One shard with retries


@dataclass
class StreamStats:
    """Counters of one stream (cumulative over its life; thread-safe)."""

    shards_opened: int = 0  # distinct shard reads started (a retry is not counted here)
    retries: int = 0
    shards_skipped: int = 0
    laps: int = 0  # times a rank started its shard list over within an epoch
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, k: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + k)


def _read_shard(url: str, sample: int, byte: int, timeout: float, retries: int, retry_delay: float,
                stats: StreamStats, failed: set | None = None) -> Iterator[tuple[Group, int]]:
    """Groups of shard `url` from group number `sample` at byte `byte` on, with the number of groups read
    after each. A failure re-opens the shard at the first group not yet yielded, after 1, 2, 4 ...
    x retry_delay seconds; after `retries` retries without progress the shard is skipped (one log line,
    its URL added to `failed`)."""
    failures = 0
    stats.add("shards_opened")
    while True:
        f = None
        try:
            f = open_shard(url, byte, timeout)
            for group in iter_groups(f, byte):
                sample += 1
                byte = group.end if group.end is not None else byte
                failures = 0
                yield group, sample
            return
        except _READ_ERRORS as e:
            failures += 1
            why = str(e) if isinstance(e, ShardError) else f"{url}: {type(e).__name__}: {e}"
            stats.last_error = why
            if failures > retries:
                stats.add("shards_skipped")
                if failed is not None:
                    failed.add(url)
                log.warning("skipping shard %s after %d attempt(s), %d sample(s) read: %s", url, failures,
                            sample, why)
                return
            stats.add("retries")
            log.info("retrying shard %s in %.1f s (attempt %d): %s", url, retry_delay * 2 ** (failures - 1),
                     failures + 1, why)
            time.sleep(retry_delay * 2 ** (failures - 1))
        finally:
            if f is not None:
                f.close()


# ---------------------------------------------------------------------------------------------------
# Order and epoch length


def rank_shards(n_shards: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Shard indices rank `rank` reads in `epoch`, in order: every world_size-th of a (seed, epoch) permutation."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards)[rank::world_size]


def reader_shards(rank_list: np.ndarray, reader: int, readers: int) -> list[int]:
    return [int(i) for i in rank_list[reader::readers]]


def stream_steps(counts: np.ndarray, world_size: int, batch_size: int) -> int:
    """Steps per epoch that every rank can run in every epoch: each rank gets >= floor(n / world) shards,
    which hold at least the sum of the floor(n / world) smallest counts."""
    per_rank = len(counts) // world_size
    return int(np.sort(np.asarray(counts, np.int64))[:per_rank].sum()) // batch_size


class StreamSample(NamedTuple):
    data: bytes  # encoded image bytes as stored
    label: int  # -1 when the sample has no label member
    sample_id: int  # see sample_id()
    name: str  # "<shard url>#<key>", for messages


class _Pos(NamedTuple):
    cursor: int  # index into the reader's shard list
    sample: int  # groups already read from that shard
    byte: int  # byte offset of the next group in that shard


class _Input(NamedTuple):
    sample: StreamSample
    reader_pos: _Pos  # the reader's position after this sample


_END = object()


class _Prefetch:
    """Runs a generator on a daemon thread, `depth` items ahead; errors are re-raised to the consumer."""

    def __init__(self, gen, depth: int):
        self.q: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name="shard-reader")
        self.thread.start()

    def _run(self, gen) -> None:
        try:
            for item in gen:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)
        finally:
            gen.close()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.q.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()  # the thread stops at its next item and closes its shard (kills a pipe command)


class ShardStream:
    """One rank's stream of `StreamSample`s per epoch (see the module doc for order, length and position).

    `len(stream)` = steps per epoch; a pass (`iter`) yields exactly `len(stream) * batch_size` samples of
    the current epoch, or the rest of them after `load_state_dict`: like a loader's `set_epoch(e, step)`,
    a loaded position applies to the next pass only. `set_epoch(e)` starts epoch e from its beginning.
    `state_dict()` is the position after the last sample yielded.
    """

    def __init__(self, source: StreamSource | str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, readers: int = 2, shuffle_buffer: int = 1000, retries: int = 3,
                 retry_delay: float = 1.0, timeout: float = 60.0, prefetch: int = 64,
                 samples_per_shard: int | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if readers < 1 or shuffle_buffer < 1 or retries < 0 or prefetch < 0:
            raise ValueError(f"readers={readers} and shuffle_buffer={shuffle_buffer} must be >= 1, "
                             f"retries={retries} and prefetch={prefetch} >= 0")
        if isinstance(source, StreamSource):
            if samples_per_shard is not None:
                raise ValueError("samples_per_shard belongs to the StreamSource: pass it to open_stream_source")
        else:
            source = open_stream_source(source, samples_per_shard, timeout, retries, retry_delay)
        if len(source) < world_size:
            raise ValueError(f"data source {source.pattern!r}: {len(source)} shard(s) < {world_size} ranks; "
                             f"every rank needs a shard of its own")
        self.source = source
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.readers, self.shuffle_buffer, self.prefetch = readers, shuffle_buffer, prefetch
        self.retries, self.retry_delay, self.timeout = retries, retry_delay, timeout
        self.steps = stream_steps(source.counts, world_size, batch_size)
        if self.steps < 1:
            raise ValueError(f"data source {source.pattern!r}: {len(source)} shard(s) of {source.counts.min()}+ "
                             f"samples ({source.counts_from}) hold less than one batch of {batch_size} per rank "
                             f"on {world_size} rank(s)")
        self.stats = StreamStats()
        self.bad_samples = BadFileLog()
        self.epoch = epoch
        self._state = self._epoch_start()
        self._resume: dict | None = None
        self._pass = None
        self._failed: set[str] = set()

    def __len__(self) -> int:
        return self.steps

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def samples_per_epoch(self) -> int:
        return self.steps * self.batch_size

    # -- position -------------------------------------------------------------------------------------
    def _config(self) -> list:
        return [len(self.source), self.world_size, self.rank, self.readers, self.shuffle_buffer, self.batch_size,
                self.seed]

    def _epoch_start(self, epoch: int | None = None) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch if epoch is None else epoch, "emitted": 0, "block": 0,
                "block_emitted": 0, "lap": 0, "rr": 0, "readers": [[0, 0, 0] for _ in range(self.readers)],
                "config": self._config()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._resume = epoch, None
        self._state = self._epoch_start()

    def state_dict(self) -> dict:
        """Position after the last sample yielded, as ints and lists (loads with torch.load(weights_only=True)):
        version, epoch, emitted (samples of the epoch yielded), block, block_emitted, lap, rr, readers
        ([shard cursor, samples read, byte offset] of each reader when the block started), config."""
        return _copy_state(self._state)

    def approximate_state(self, epoch: int, emitted: int) -> dict:
        """A position `emitted` samples into `epoch` for a resume without a state of this configuration
        (another world size, shuffle buffer or shard list): each reader starts at the same fraction of its
        shard list as the epoch has run, so mostly unread shards follow. Not exact, but the epoch keeps
        its length: the pass yields the remaining `samples_per_epoch - emitted` samples."""
        if not 0 <= emitted <= self.samples_per_epoch:
            raise ValueError(f"position {emitted} outside the epoch's {self.samples_per_epoch} samples")
        fraction = emitted / self.samples_per_epoch
        order = rank_shards(len(self.source), self.seed, epoch, self.rank, self.world_size)
        cursors = [int(fraction * len(reader_shards(order, w, self.readers))) for w in range(self.readers)]
        block, done = divmod(emitted, self.shuffle_buffer)
        return dict(self._epoch_start(epoch), emitted=emitted, block=block, block_emitted=done,
                    readers=[[c, 0, 0] for c in cursors])

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        names = ["shards", "world_size", "rank", "readers", "shuffle_buffer", "batch_size", "seed"]
        diff = [f"{n} {a} -> {b}" for n, a, b in zip(names, state["config"], self._config()) if a != b]
        if diff:
            raise ValueError(f"stream state of another configuration ({', '.join(diff)}): cannot resume exactly")
        self.epoch = int(state["epoch"])
        self._state = self._resume = _copy_state(state)

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamSample]:
        self.close()  # one pass at a time: a pass left mid-way stops reading
        self._state = self._resume if self._resume is not None else self._epoch_start()
        self._resume = None
        self._pass = self._run(_copy_state(self._state))
        return self._pass

    def batches(self) -> Iterator[tuple[list[StreamSample], dict]]:
        """A pass in lists of `batch_size` samples, each with the position after it. A loader that prefetches
        keeps these and checkpoints the position of the last batch the trainer took, not the stream's."""
        it = iter(self)
        while batch := list(itertools.islice(it, self.batch_size)):
            yield batch, self.state_dict()

    def close(self) -> None:
        """Stop the current pass: its reader threads end, open shards close, `pipe:` commands are killed.
        Call it (or finish the pass) before dropping a stream: running reader threads keep it alive."""
        if self._pass is not None:
            self._pass.close()
            self._pass = None

    def _run(self, state: dict) -> Iterator[StreamSample]:
        epoch, limit, S = state["epoch"], self.samples_per_epoch, self.shuffle_buffer
        lists = [reader_shards(rank_shards(len(self.source), self.seed, epoch, self.rank, self.world_size), w,
                               self.readers) for w in range(self.readers)]
        lap, rr = state["lap"], state["rr"]
        pos = [_Pos(*p) for p in state["readers"]]
        iters: list = [None] * self.readers
        fresh_lap = all(p == (0, 0, 0) for p in pos)  # read from its start: a lap that yields nothing is fatal
        lap_samples = 0

        def start(w: int):
            gen = self._reader(lists[w], pos[w], lap)
            return _Prefetch(gen, self.prefetch) if self.prefetch else gen

        def next_input() -> StreamSample:
            nonlocal lap, rr, fresh_lap, lap_samples
            while True:
                if all(it is _END for it in iters):  # every reader has finished this lap: start the next
                    if fresh_lap and lap_samples == 0:
                        raise RuntimeError(f"data source {self.source.pattern!r}: rank {self.rank} read no sample "
                                           f"from any of its shards in epoch {epoch} ({self.stats.last_error})")
                    lap, rr, fresh_lap, lap_samples = lap + 1, 0, True, 0
                    self.stats.add("laps")
                    log.warning("rank %d ran out of samples in epoch %d before its %d: reading its shards again "
                                "(lap %d)", self.rank, epoch, limit, lap)
                    for w in range(self.readers):
                        pos[w] = _Pos(0, 0, 0)
                        iters[w] = start(w)
                w, rr = rr, (rr + 1) % self.readers
                if iters[w] is _END:
                    continue
                item = next(iters[w], _END)
                if item is _END:
                    iters[w] = _END
                    continue
                pos[w] = item.reader_pos
                lap_samples += 1
                return item.sample

        def where() -> dict:
            return {"lap": lap, "rr": rr, "readers": [list(p) for p in pos]}

        block, done = state["block"], state["block_emitted"]
        self._failed = set()  # shards skipped in this pass: a later lap does not try them again
        try:
            if block * S < limit:
                for w in range(self.readers):
                    iters[w] = start(w)
            while block * S < limit:
                at_start = where()
                size = min(S, limit - block * S)
                items = [next_input() for _ in range(size)]
                order = np.random.default_rng([self.seed, epoch, self.rank, block]).permutation(size)
                after = where()
                for i in range(done, size):
                    if i + 1 < size:
                        self._state = dict(self._state, epoch=epoch, emitted=block * S + i + 1, block=block,
                                           block_emitted=i + 1, **at_start)
                    else:  # block finished: the position is the next block's start (nothing to re-read)
                        self._state = dict(self._state, epoch=epoch, emitted=block * S + size, block=block + 1,
                                           block_emitted=0, **after)
                    yield items[order[i]]
                block, done = block + 1, 0
        finally:
            for it in iters:
                if isinstance(it, _Prefetch):
                    it.close()
                elif it is not None and it is not _END:
                    it.close()

    def _reader(self, shards: list[int], pos: _Pos, lap: int) -> Iterator[_Input]:
        """A reader's samples in this lap from `pos` on, each with the reader's position after it."""
        cursor, sample, byte = pos
        for c in range(cursor, len(shards)):
            index = shards[c]
            url = self.source.shards[index]
            if url in self._failed:
                continue
            first_sample, first_byte = (sample, byte) if c == cursor else (0, 0)
            for group, n in _read_shard(url, first_sample, first_byte, self.timeout, self.retries, self.retry_delay,
                                        self.stats, self._failed):
                image, label = image_and_label(group.members)
                name = f"{url}#{group.key}"
                if image is None:
                    self.bad_samples.add(name, "no image member (" + ", ".join(IMAGE_EXTS) + ")")
                    continue
                after = _Pos(c + 1, 0, 0) if group.end is None else _Pos(c, n, group.end)
                yield _Input(StreamSample(image, label, sample_id(index, group.key, lap), name), after)


def _copy_state(state: dict) -> dict:
    return {k: ([list(r) for r in v] if k == "readers" else list(v)) if isinstance(v, list) else v
            for k, v in state.items()}
