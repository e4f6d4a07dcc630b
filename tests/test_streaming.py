"""Streamed webdataset shards (pipelines/streaming.py) and the shard writer (pipelines/write_shards.py).

Shards are written from real imagenette160 JPEGs by the writer and served on the loopback by Python's
http.server (a handler that can answer Range requests or not, drop a connection halfway through a shard,
answer 404 or stall), read through `pipe:cat`, and from local files."""

from __future__ import annotations

import http.server
import io
import json
import logging
import re
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import SPEC_PRESETS, StreamOptions, build_loader
from pipelines.sources import open_source
from pipelines.streaming import (ShardError, ShardStream, expand_shards, index_url, iter_groups, open_shard,
                                 open_stream_source, rank_shards, stream_steps)
from pipelines.write_shards import main as write_main
from pipelines.write_shards import parse_size, write_shards

FAST = dict(retry_delay=0.01, timeout=5.0)  # retries back off 10, 20, 40 ms here (1, 2, 4 s by default)


# ------------------------------------------------------------------------------------------------
# Fixtures: an ImageFolder, its shards, a loopback server


@pytest.fixture(scope="module")
def folder(imagenette, tmp_path_factory) -> Path:
    """48 real JPEGs in 4 classes (imagenette160/train), as symlinks."""
    root = tmp_path_factory.mktemp("folder")
    for cls in sorted((imagenette / "train").iterdir())[:4]:
        (root / cls.name).mkdir()
        for f in sorted(cls.glob("*.jpg"))[:12]:
            (root / cls.name / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> dict:
    """8 shards x 6 samples written by the writer, with its index."""
    out = tmp_path_factory.mktemp("shards")
    report = write_shards(folder, str(out / "train-%03d.tar"), max_count=6, progress=False)
    assert len(report["shards"]) == 8
    return dict(report, dir=out)


@pytest.fixture(scope="module")
def truth(folder) -> dict:
    """image bytes -> label, from the ImageFolder scan."""
    src = open_source(folder)
    return {src.read(i): int(src.labels[i]) for i in range(len(src))}


class ShardHandler(http.server.BaseHTTPRequestHandler):
    """GET /range/NAME (Range requests honoured) or /norange/NAME (always the whole file), with faults set
    per file name in `server.faults`: "drop" (close after half the file, every time), "flaky" (only the
    first request drops), "404", "stall" (headers, then silence)."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        mode, _, name = self.path.lstrip("/").partition("/")
        server = self.server
        with server.lock:
            server.requests[name] = n = server.requests.get(name, 0) + 1
        fault = server.faults.get(name)
        path = server.root / name
        if fault == "404" or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and mode == "range":
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "stall":
            time.sleep(3)
            return
        if fault == "drop" or (fault == "flaky" and n == 1):
            body = body[: max(0, len(data) // 2 - start)]
        self.wfile.write(body)
        self.close_connection = True


@pytest.fixture(scope="module")
def server(shards):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.daemon_threads = True
    srv.root, srv.faults, srv.requests, srv.lock = shards["dir"], {}, {}, threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def faults(server):
    """Set faults for one test; cleared (with the request counts) afterwards."""
    server.faults.clear()
    server.requests.clear()
    yield server.faults
    server.faults.clear()
    server.requests.clear()


def local(shards) -> str:
    return str(shards["dir"] / "train-{000..007}.tar")


def http_pattern(server, mode="range") -> str:
    return f"{server.url}/{mode}/train-{{000..007}}.tar"


def samples(stream) -> list[tuple[int, bytes, int]]:
    return [(s.sample_id, s.data, s.label) for s in stream]


def groups_of(path: Path) -> list:
    with open(path, "rb") as f:
        return list(iter_groups(f))


def roundtrip(state: dict) -> dict:
    """Through a checkpoint file as the trainer writes it, loaded the safe way."""
    buf = io.BytesIO()
    torch.save({"stream": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["stream"]


# ------------------------------------------------------------------------------------------------
# Writer


def test_writer_shards_hold_every_image_once_with_its_label(shards, truth, folder):
    pattern = shards["pattern"]
    assert pattern.endswith("train-{000..007}.tar")
    seen = {}
    for s in shards["shards"]:
        groups = groups_of(shards["dir"] / s["name"])
        with tarfile.open(shards["dir"] / s["name"]) as tf:
            names = tf.getnames()
        assert len(groups) == s["samples"] == 6 and len(names) == 12
        for g in groups:
            assert set(g.members) == {"jpg", "cls"} and "/" in g.key  # KEY.jpg + KEY.cls, key = class/stem
            seen[g.members["jpg"]] = int(g.members["cls"])
        assert (shards["dir"] / s["name"]).stat().st_size == s["bytes"]
    assert seen == truth  # every image exactly once, label = index of its sorted class folder
    first_shard = [int(g.members["cls"]) for g in groups_of(shards["dir"] / "train-000.tar")]
    assert len(set(first_shard)) > 1  # written in a shuffled order: a shard mixes classes
    index = json.loads((shards["dir"] / "train.index.json").read_text())
    assert index["num_samples"] == 48 and index["classes"] == sorted(p.name for p in folder.iterdir())
    assert [s["name"] for s in index["shards"]] == [f"train-{k:03d}.tar" for k in range(8)]
    assert not list(shards["dir"].glob("*.tmp*"))  # nothing half-written left behind


def test_writer_max_size_cli_and_bad_input(folder, tmp_path, capsys):
    (tmp_path / "bad" / "a").mkdir(parents=True)
    for f in sorted(folder.glob("*/*.jpg"))[:5]:
        (tmp_path / "bad" / "a" / f.name).symlink_to(f.resolve())
    (tmp_path / "bad" / "a" / "empty.jpg").write_bytes(b"")
    report = write_main([str(tmp_path / "bad"), str(tmp_path / "out" / "s-%02d.tar"), "--max-size", "30KB"])
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "out" / f"s-{{00..{len(report['shards']) - 1:02d}}}.tar")
    assert "skipped" in out.err and "empty.jpg: zero-byte file" in out.err
    assert report["num_samples"] == 5 and len(report["shards"]) > 1
    for s in report["shards"]:
        assert s["bytes"] <= 30_000 or s["samples"] == 1  # a shard only exceeds the limit with a single sample
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("1e6") == 10**6
    with pytest.raises(ValueError, match="--max-size '1 parsec'"):
        parse_size("1 parsec")
    with pytest.raises(ValueError, match="OUT_PATTERN 'x.tar'"):
        write_shards(folder, "x.tar")
    with pytest.raises(ValueError, match="already webdataset shards"):
        write_shards(tmp_path / "out", str(tmp_path / "again-%d.tar"))


# ------------------------------------------------------------------------------------------------
# Sources: local, HTTP, pipe: give the same stream


@pytest.mark.parametrize("transport", ["http-range", "http-norange", "pipe"])
def test_transports_give_the_same_stream(transport, shards, server, faults, truth):
    ref = samples(ShardStream(local(shards), batch_size=6, shuffle_buffer=10, **FAST))
    assert len(ref) == 48 and {d for _, d, _ in ref} == set(truth)  # one epoch = every sample once
    assert all(truth[d] == label for _, d, label in ref)
    pattern = {"http-range": http_pattern(server), "http-norange": http_pattern(server, "norange"),
               "pipe": f"pipe:cat {shards['dir']}/train-{{000..007}}.tar"}[transport]
    stream = ShardStream(pattern, batch_size=6, shuffle_buffer=10, **FAST)
    assert stream.source.counts_from.startswith("index") and stream.num_classes == 4  # index found beside them
    assert samples(stream) == ref


# ------------------------------------------------------------------------------------------------
# Order: ranks, epochs, shuffle


@pytest.mark.parametrize("world, readers", [(2, 2), (3, 1)])
def test_ranks_disjoint_and_covering(world, readers, shards):
    streams = [ShardStream(local(shards), batch_size=4, rank=r, world_size=world, readers=readers,
                           shuffle_buffer=5, seed=1, **FAST) for r in range(world)]
    assert len({len(s) for s in streams}) == 1  # every rank runs the same number of steps
    ids = [[x.sample_id for x in s] for s in streams]
    assert all(len(i) == len(streams[0]) * 4 == len(set(i)) for i in ids)
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(ids[a]) & set(ids[b])
    union = set().union(*map(set, ids))
    if world == 2:  # 8 shards of 6 split evenly: the epoch is the whole data set
        assert len(union) == 48
    else:  # 8 shards on 3 ranks: 2 shards' worth of steps per rank (12 samples), from disjoint shards
        assert len(streams[0]) == 3 and len(union) == 36
    for s in streams:
        s.set_epoch(1)
    ids1 = [[x.sample_id for x in s] for s in streams]
    assert ids1[0] != ids[0]  # another epoch: another shard permutation and shuffle


def test_stream_steps_hold_for_every_rank_and_epoch():
    """The epoch length fits whatever shards a rank gets: checked against 200 epochs' real splits."""
    counts = np.array([5, 7, 7, 2, 9, 9, 3, 8, 8, 1, 6])
    for world in (1, 2, 3, 4):
        steps = stream_steps(counts, world, batch_size=3)
        least = min(counts[rank_shards(len(counts), 0, e, r, world)].sum() for e in range(200) for r in range(world))
        assert steps * 3 <= least and (steps + 1) * 3 > np.sort(counts)[: len(counts) // world].sum()


def test_shuffle_buffer_mixes_within_blocks(shards):
    plain = ShardStream(local(shards), batch_size=6, shuffle_buffer=1, readers=1, **FAST)
    mixed = ShardStream(local(shards), batch_size=6, shuffle_buffer=12, readers=1, **FAST)
    a, b = [s.sample_id for s in plain], [s.sample_id for s in mixed]
    assert a != b and sorted(a) == sorted(b)
    for k in range(0, 48, 12):  # a block never holds a sample read more than shuffle_buffer samples ago
        assert set(a[k:k + 12]) == set(b[k:k + 12])


# ------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("readers, buffer, prefetch, transport", [
    (1, 1, 0, "local"), (2, 10, 0, "local"), (2, 10, 8, "local"), (3, 7, 4, "http"), (2, 10, 0, "pipe"),
])
def test_resume_is_exact(readers, buffer, prefetch, transport, shards, server, faults):
    pattern = {"local": local(shards), "http": http_pattern(server),
               "pipe": f"pipe:cat {shards['dir']}/train-{{000..007}}.tar"}[transport]

    def make():
        return ShardStream(pattern, batch_size=4, readers=readers, shuffle_buffer=buffer, prefetch=prefetch,
                           seed=7, epoch=2, **FAST)

    ref = samples(make())
    # cut points: first sample, inside a block, on a block boundary, past shard boundaries, the last one
    for k in sorted({1, 5, buffer, 2 * buffer + 3, 19, len(ref) - 1}):
        a = make()
        it = iter(a)
        head = [next(it) for _ in range(k)]
        state = roundtrip(a.state_dict())
        a.close()
        assert state["emitted"] == k and state["epoch"] == 2
        b = make()
        b.set_epoch(0)  # the loaded state sets the epoch back
        b.load_state_dict(state)
        assert [(s.sample_id, s.data, s.label) for s in head] + samples(b) == ref, f"resume after {k}"
        assert samples(b) == ref  # a loaded position applies to one pass; the next is the whole epoch


def test_resume_refuses_another_configuration(shards):
    a = ShardStream(local(shards), batch_size=4, shuffle_buffer=4, **FAST)
    next(iter(a))
    state = a.state_dict()
    b = ShardStream(local(shards), batch_size=4, shuffle_buffer=8, **FAST)
    with pytest.raises(ValueError, match="shuffle_buffer 4 -> 8"):
        b.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize("mode", ["range", "norange"])
def test_connection_dropped_mid_shard_is_resumed_without_duplicates(mode, shards, server, faults):
    ref = samples(ShardStream(local(shards), batch_size=6, shuffle_buffer=10, **FAST))
    for k in range(8):
        faults[f"train-{k:03d}.tar"] = "flaky"  # every shard's first request breaks halfway
    stream = ShardStream(http_pattern(server, mode), batch_size=6, shuffle_buffer=10, **FAST)
    server.requests.clear()  # the start-up check read shard 0's first header: make its next request break too
    assert samples(stream) == ref
    assert stream.stats.retries == 8 and stream.stats.shards_skipped == 0 and stream.stats.laps == 0


def test_shard_broken_for_good_is_skipped_logged_and_the_epoch_filled(shards, server, faults, caplog):
    faults["train-003.tar"] = "drop"
    stream = ShardStream(http_pattern(server), batch_size=6, shuffle_buffer=10, retries=2, **FAST)
    with caplog.at_level(logging.INFO, logger="pipelines.streaming"):
        got = list(stream)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping shard")]
    assert len(skips) == 1 and f"{server.url}/range/train-003.tar" in skips[0] and "3 attempt(s)" in skips[0]
    assert stream.stats.shards_skipped == 1 and stream.stats.retries == 2 and stream.stats.laps == 1
    assert len(got) == 48 and len({s.sample_id for s in got}) == 48  # the epoch's length holds, ids unique
    # what shard 3 delivered: the samples wholly in its first half, each once
    groups = groups_of(shards["dir"] / "train-003.tar")
    half = (shards["dir"] / "train-003.tar").stat().st_size // 2
    whole = {g.members["jpg"] for g in groups if g.end is not None and g.end + 512 <= half}  # next header read
    data = [s.data for s in got if "/train-003.tar#" in s.name]
    assert 0 < len(whole) < 6 and sorted(data) == sorted(whole)  # not read again in the lap either


def test_missing_shard_404_is_skipped(shards, server, faults, caplog):
    faults["train-005.tar"] = "404"
    stream = ShardStream(http_pattern(server), batch_size=6, shuffle_buffer=10, retries=1, **FAST)
    with caplog.at_level(logging.WARNING, logger="pipelines.streaming"):
        got = list(stream)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping shard")]
    assert len(skips) == 1 and "train-005.tar" in skips[0] and "HTTP 404" in skips[0]
    assert stream.stats.shards_skipped == 1 and len(got) == 48
    assert not any("train-005" in s.name for s in got)


def test_failing_command_is_skipped_with_its_stderr(shards, caplog):
    d = shards["dir"]
    pattern = f"pipe:cat {d}/{{train-000.tar,train-001.tar,missing.tar,train-003.tar}}"
    with caplog.at_level(logging.WARNING, logger="pipelines.streaming"):
        stream = ShardStream(pattern, batch_size=6, shuffle_buffer=4, retries=1, **FAST)
        assert stream.source.counts_from.startswith("estimated from pipe:cat")  # the index lacks missing.tar
        got = list(stream)
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping shard")]
    assert len(skips) == 1 and f"pipe:cat {d}/missing.tar" in skips[0]
    assert "exited with status 1" in skips[0] and "No such file" in skips[0]
    assert len(got) == 24 and stream.stats.shards_skipped == 1 and stream.stats.laps == 1


def test_reads_time_out(shards, server, faults, caplog):
    faults["train-000.tar"] = "stall"
    stream = ShardStream(http_pattern(server), batch_size=6, shuffle_buffer=10, retries=0, retry_delay=0.01,
                         timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="pipelines.streaming"):
        got = list(stream)
    assert len(got) == 48 and stream.stats.shards_skipped == 1
    assert any("train-000.tar" in r.getMessage() and "timed out" in r.getMessage() for r in caplog.records)
    reader = open_shard("pipe:sleep 30", timeout=0.3)
    with pytest.raises(ShardError, match=r"pipe:sleep 30: no data for 0.3 s"):
        reader.read(512)
    reader.close()
    assert reader.proc.poll() is not None  # the command was killed, not left running


def test_bad_input_is_named_before_training(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown scheme 's3'.*pipe:aws s3 cp"):
        expand_shards("s3://bucket/train-{000..009}.tar")
    with pytest.raises(ValueError, match=r"'x-\{5..3\}.tar': the pattern expands to zero shards"):
        open_stream_source("x-{5..3}.tar")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(ValueError, match=rf"cannot read any.*http://127.0.0.1:{port}/train-0.tar"):
        open_stream_source(f"http://127.0.0.1:{port}/train-{{0..9}}.tar", timeout=2)
    with pytest.raises(ValueError, match="pipe:false: exited with status 1"):
        open_stream_source("pipe:false")
    with pytest.raises(ValueError, match="no-such-dir/s-0.tar"):
        open_stream_source(str(tmp_path / "no-such-dir" / "s-{0..3}.tar"))
    with pytest.raises(ValueError, match="8 shard.*< 9 ranks"):
        ShardStream(local(shards), batch_size=1, world_size=9, rank=0)
    with pytest.raises(ValueError, match="less than one batch of 64"):
        ShardStream(local(shards), batch_size=64)


# ------------------------------------------------------------------------------------------------
# Epoch length


def test_epoch_length_from_counts_estimate_and_laps(shards, tmp_path, caplog):
    # an over-estimate: the rank runs short and reads its shards again, with new ids for the repeats
    over = ShardStream(local(shards), batch_size=4, shuffle_buffer=6, samples_per_shard=9, **FAST)
    got = list(over)
    assert len(over) == 18 and len(got) == 72 and over.stats.laps == 1
    assert len({s.sample_id for s in got}) == 72 and len({s.data for s in got}) == 48
    # an under-estimate: fewer steps, the rest left for other epochs
    under = [ShardStream(local(shards), batch_size=4, rank=r, world_size=2, samples_per_shard=3, **FAST)
             for r in range(2)]
    assert [len(u) for u in under] == [3, 3] and [len(list(u)) for u in under] == [12, 12]
    # no index and no count: one shard is counted (the same on every rank), and the choice is logged
    for f in shards["dir"].glob("train-*.tar"):
        (tmp_path / f.name).symlink_to(f)
    with caplog.at_level(logging.WARNING, logger="pipelines.streaming"):
        est = ShardStream(str(tmp_path / "train-{000..007}.tar"), batch_size=4, **FAST)
    assert est.source.counts_from == f"estimated from {tmp_path}/train-000.tar" and len(est) == 12
    assert any("assuming 6 samples per shard" in r.getMessage() for r in caplog.records)
    assert index_url(str(tmp_path / "train-{000..007}.tar")) == str(tmp_path / "train.index.json")
    # a folder of shards: its *.tar files, and the index beside them
    folder_source = open_stream_source(shards["dir"])
    assert len(folder_source) == 8 and folder_source.counts_from == f"index {shards['dir']}/train.index.json"


# ------------------------------------------------------------------------------------------------
# Start-up does not read ahead: 10,000 shards


def _tiny_shards(root: Path, n: int) -> str:
    """n one-sample shards (an 8x8 JPEG + its label); the same bytes in each (ids key on the shard index)."""
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(jpeg, format="JPEG")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for ext, data in (("jpg", jpeg.getvalue()), ("cls", b"0")):
            info = tarfile.TarInfo(f"sample.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shard = out.getvalue()[:3072]  # the members + the end-of-archive blocks, without the record padding
    root.mkdir()
    for k in range(n):
        (root / f"t-{k:05d}.tar").write_bytes(shard)
    return str(root / f"t-{{00000..{n - 1:05d}}}.tar")


def test_startup_reads_only_what_the_first_batch_needs(tmp_path):
    opened = {}
    for n in (10, 10_000):
        pattern = _tiny_shards(tmp_path / str(n), n)
        for prefetch in (0, 8):
            stream = ShardStream(pattern, batch_size=2, readers=2, shuffle_buffer=4, prefetch=prefetch,
                                 samples_per_shard=1, **FAST)
            first = next(iter(stream))
            opened[n, prefetch] = stream.stats.shards_opened
            stream.close()
            assert first.data.startswith(b"\xff\xd8") and len(stream) == n // 2
    assert opened[10, 0] == opened[10_000, 0] == 4  # the one block of 4 samples (1-sample shards), no more
    assert opened[10_000, 8] <= 4 + 2 * (8 + 1)  # read-ahead bounded by the prefetch depth, not by n
    # the same through the launcher's check, the plan and the loader (no shard index: counts given)
    from trainer.config import validate_data
    from trainer.plan import describe_source

    validate_data(pattern, stream=True)
    assert describe_source(pattern, stream=True, samples_per_shard=1)["shards"] == 10_000
    loader = stream_loader(pattern, batch_size=2, num_workers=0,
                           options=StreamOptions(shuffle_buffer=4, samples_per_shard=1, prefetch=0))
    assert next(iter(loader)).global_views.shape[0] == 2 and loader.stream.stats.shards_opened == 4
    loader.close()


# ------------------------------------------------------------------------------------------------
# The tar reader


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_groups_keys_like_webdataset(fmt):
    deep = "d" * 60 + "/" + "e" * 30  # > 100 characters with the file name: ustar prefix, GNU 'L', pax path
    members = [(f"{deep}/a.jpg", b"A" * 700), (f"{deep}/a.cls", b"3"), (f"{deep}/a.json", b"{}"),
               ("b.seg.png", b"B"), ("b.png", b"P" * 10), ("b.label", b" 7\n"), ("README", b"no key"),
               ("c.cls", b"1")]
    data = _tar(members, fmt)
    groups = list(iter_groups(io.BytesIO(data)))
    assert [g.key for g in groups] == [f"{deep}/a", "b", "c"]
    assert groups[0].members == {"jpg": b"A" * 700, "cls": b"3"}  # image + label kept, others dropped
    assert groups[1].members == {"png": b"P" * 10, "label": b" 7\n"}  # "seg.png" is not an image extension
    assert groups[2].members == {"cls": b"1"} and groups[2].end is None
    # each group's `end` is the next one's `start`: reading from there gives the rest of the shard
    rest = list(iter_groups(io.BytesIO(data[groups[0].end:]), base=groups[0].end))
    assert rest == groups[1:]
    # a shard cut short (no end-of-archive block) or a bad offset is an error, not a short shard
    with pytest.raises(tarfile.ReadError, match="end of data"):
        list(iter_groups(io.BytesIO(data[: groups[2].start])))
    inside = data.index(b"A" * 700)  # a resume offset inside a member's data
    with pytest.raises(tarfile.ReadError, match=f"bad tar header at byte {inside}"):
        list(iter_groups(io.BytesIO(data[inside:]), base=inside))


def test_sample_without_image_is_counted_and_skipped(tmp_path, caplog):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    for k in range(2):
        (tmp_path / f"s-{k}.tar").write_bytes(_tar([(f"x{k}.jpg", jpeg.getvalue()), (f"x{k}.cls", b"1"),
                                                   (f"y{k}.cls", b"2"), (f"z{k}.jpg", jpeg.getvalue())]))
    with caplog.at_level(logging.WARNING, logger="pipelines.streaming"):
        stream = ShardStream(str(tmp_path), batch_size=2, samples_per_shard=2, **FAST)  # a folder of shards
        got = list(stream)
    assert sorted(s.name.rsplit("#", 1)[1] for s in got) == ["x0", "x1", "z0", "z1"]
    assert sorted(s.label for s in got) == [-1, -1, 1, 1]  # no label member: -1
    assert stream.bad_samples.total == 2
    assert sorted(stream.bad_samples.counts) == [f"{tmp_path}/s-{k}.tar#y{k}" for k in range(2)]
    assert sum("no image member" in r.getMessage() for r in caplog.records) == 2


def test_batches_carry_the_position_after_them(shards):
    stream = ShardStream(local(shards), batch_size=5, shuffle_buffer=7, **FAST)
    ref = samples(stream)
    got = list(stream.batches())
    assert len(got) == len(stream) == 9 and all(len(b) == 5 for b, _ in got)
    assert [(s.sample_id, s.data, s.label) for b, _ in got for s in b] == ref
    assert [st["emitted"] for _, st in got] == [5 * (k + 1) for k in range(9)]
    again = ShardStream(local(shards), batch_size=5, shuffle_buffer=7, **FAST)
    again.load_state_dict(got[3][1])  # the position a loader would checkpoint after its 4th batch
    assert [s.sample_id for b, _ in again.batches() for s in b] == [i for i, _, _ in ref[20:]]


# ------------------------------------------------------------------------------------------------
# Loaders over streams (pipelines.build_loader -> sources.StreamedLoader; the torchvision reference)

SPEC = SPEC_PRESETS["cpu-small"].replace(global_size=32, local_size=16, local_views=2)
QUICK = StreamOptions(shuffle_buffer=10, retry_delay=0.01, timeout=5.0)


def stream_loader(pattern, batch_size=4, options=QUICK, backend="torchvision", **kw):
    return build_loader(pattern, SPEC, backend=backend, batch_size=batch_size, device="cpu", seed=3,
                        stream=options, **kw)


def tensors(batches) -> list[tuple[torch.Tensor, ...]]:
    return [(b.global_views, b.local_views, b.labels) for b in batches]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_streamed_loader_renders_the_streams_samples_with_the_one_parameter_sampler(shards, server, faults, truth):
    from pipelines.params import sample_views
    from pipelines.sources import decode_pil
    from pipelines.torchvision_backend import render_sample

    loader = stream_loader(local(shards), num_workers=0)
    assert type(loader).__name__ == "TorchvisionStreamLoader" and len(loader) == 12 and loader.num_classes == 4
    got = tensors(loader)
    # independently: the stream's samples, decoded, views drawn from (seed, epoch, sample id)
    stream = ShardStream(local(shards), batch_size=4, shuffle_buffer=10, seed=3, **FAST)
    want = []
    for batch, _ in stream.batches():
        images = [decode_pil(s.data) for s in batch]
        params = sample_views(SPEC, 3, 0, [s.sample_id for s in batch], [i.height for i in images],
                              [i.width for i in images])
        views = [render_sample(image, p, SPEC) for image, p in zip(images, params)]
        want.append((torch.stack([g for g, _ in views]), torch.stack([loc for _, loc in views]),
                     torch.tensor([truth[s.data] for s in batch])))
    assert_same(got, want)
    # the same batches over HTTP and through pipe:cat, with workers decoding
    for pattern in (http_pattern(server), f"pipe:cat {shards['dir']}/train-{{000..007}}.tar"):
        assert_same(tensors(stream_loader(pattern, num_workers=2)), got)
    loader.set_epoch(1)
    assert not torch.equal(tensors(loader)[0][0], got[0][0])  # another epoch, another order and other views


@pytest.mark.dali
def test_dali_reads_the_same_stream_with_the_same_random_views(shards, server, faults):
    """DALI's feed takes the stream's batches (sources.StreamedLoader): same samples, same labels, and views
    drawn from the same (seed, epoch, sample id) as the torchvision reference, up to DALI's documented
    rendering differences (tests/test_cross_backend.py)."""
    ref = tensors(stream_loader(local(shards), num_workers=0))
    dali = stream_loader(http_pattern(server), backend="auto", num_workers=2)
    assert type(dali).__name__ == "DaliStreamLoader"
    got = tensors(dali)
    assert len(got) == len(ref)
    corr = []
    for (g, loc, labels), (rg, rloc, rlabels) in zip(got, ref):
        assert torch.equal(labels, rlabels)
        for a, b in ((g, rg), (loc, rloc)):
            x, y = a.flatten(2), b.flatten(2)  # [B, V, pixels]
            x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
            corr.append(((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + 1e-6)).flatten())
    assert torch.cat(corr).median() > 0.9


@pytest.mark.parametrize("backend, workers", [("torchvision", 0), ("torchvision", 2),
                                              pytest.param("dali", 2, marks=pytest.mark.dali)])
def test_streamed_loader_resumes_at_the_last_batch_taken_not_the_last_read(backend, workers, shards):
    """Workers (or DALI's feed) read ahead: the checkpointed position is the trainer's."""
    ref = stream_loader(local(shards), backend=backend, num_workers=workers)
    first = tensors(ref)
    ref.set_epoch(1)
    second = tensors(ref)
    for k in (1, 5):
        a = stream_loader(local(shards), backend=backend, num_workers=workers)
        it = iter(a)
        head = [next(it) for _ in range(k)]
        state = roundtrip(a.state_dict())
        a.close()
        assert state["stream"]["emitted"] == 4 * k and state["counters"]["data/skipped_shards"] == 0
        b = stream_loader(local(shards), backend=backend, num_workers=workers)
        b.load_state_dict(state)
        b.set_epoch(0, k)
        assert_same(tensors(head) + tensors(b), first)
        b.set_epoch(1)
        assert_same(tensors(b), second)


def test_resume_on_another_world_size_is_approximate_and_keeps_the_epoch_length(shards):
    a = stream_loader(local(shards), rank=0, world_size=2, num_workers=0)
    steps = len(a)
    assert steps == 6
    b = stream_loader(local(shards), num_workers=0)  # one rank now: no position for it
    b.load_state_dict(None)
    with pytest.warns(UserWarning, match="no position for this world size.*epoch 0 at step 6 from the same fraction"):
        b.set_epoch(0, 6)
    rest = list(b)
    assert len(rest) == len(b) - 6 == 6
    # a state of other stream settings is refused by the stream and handled the same way
    c = stream_loader(local(shards), options=StreamOptions(shuffle_buffer=7, retry_delay=0.01), num_workers=0)
    c.load_state_dict(roundtrip(a.state_dict()))
    with pytest.warns(UserWarning, match="shuffle_buffer 10 -> 7"):
        c.set_epoch(0, 2)
    assert len(list(c)) == len(c) - 2


def test_undecodable_sample_is_replaced_within_its_batch_and_counted(tmp_path, folder, caplog):
    from pipelines.params import sample_views
    from pipelines.sources import decode_batch_replacing_bad, decode_pil
    from pipelines.torchvision_backend import render_sample

    files = sorted(folder.glob("*/*.jpg"))[:8]
    members = []
    for k, f in enumerate(files):
        data = b"\xff\xd8 not a jpeg" if k == 2 else f.read_bytes()
        members += [(f"s{k}.jpg", data), (f"s{k}.cls", str(k).encode())]
    (tmp_path / "bad-0.tar").write_bytes(_tar(members))
    options = StreamOptions(shuffle_buffer=1, readers=1, retry_delay=0.01)
    with caplog.at_level(logging.WARNING):
        loader = stream_loader(str(tmp_path / "bad-{0..0}.tar"), options=options, num_workers=1)
        batches = list(loader)
    assert len(batches) == 2 and loader.counters()["data/bad_samples"] == 1
    assert sum("bad-0.tar#s2" in r.getMessage() for r in caplog.records) == 1  # logged once, by name
    # slot 2 shows sample 3's image and label, with slot 2's own random views
    first = list(loader.stream.batches())[0][0]
    image = decode_pil(first[3].data)
    params = sample_views(SPEC, 3, 0, [first[2].sample_id], [image.height], [image.width])[0]
    g, loc = render_sample(image, params, SPEC)
    assert torch.equal(batches[0].global_views[2], g) and torch.equal(batches[0].local_views[2], loc)
    assert batches[0].labels.tolist() == [0, 1, 3, 3]
    with pytest.raises(RuntimeError, match="no image of a streamed batch of 2 decodes"):
        decode_batch_replacing_bad([(b"x", "a"), (b"", "b")], decode_pil, lambda name, why: None)


def test_streams_and_backends(shards, tmp_path):
    from pipelines import describe_backend

    pattern = local(shards)
    with pytest.raises(ValueError, match="backend 'ffcv' reads .beton files only"):
        build_loader("http://127.0.0.1:1/train-{000..007}.tar", SPEC, backend="ffcv", device="cpu")
    with pytest.raises(ValueError, match="FFCV .beton is read locally"):
        build_loader(str(tmp_path / "x.beton"), SPEC, backend="auto", device="cpu", stream=QUICK)
    assert describe_backend("auto", pattern, "cpu", stream=True).startswith("auto -> dali (no CUDA device")
    with pytest.raises(ValueError, match="unknown scheme 's3'"):
        build_loader("s3://bucket/train-{000..007}.tar", SPEC, device="cpu")
    indexed = build_loader(pattern, SPEC, backend="torchvision", batch_size=4, device="cpu", num_workers=0)
    assert type(indexed).__name__ == "TorchvisionLoader"  # local shards stay indexed unless streamed


def test_plan_describes_a_stream_without_reading_a_shard(shards, tmp_path):
    from trainer.plan import describe_source

    (tmp_path / "train.index.json").write_bytes((shards["dir"] / "train.index.json").read_bytes())
    for k in range(8):
        (tmp_path / f"train-{k:03d}.tar").write_bytes(b"not a tar: reading it would fail")
    info = describe_source(str(tmp_path / "train-{000..007}.tar"), stream=True)
    assert (info["shards"], info["samples"], info["classes"]) == (8, 48, 4)
    assert info["kind"] == "webdataset tar shards streamed from local files"
    pipe = describe_source(f"pipe:cat {tmp_path}/train-{{000..007}}.tar")
    assert pipe["samples"] == 48 and "pipe:" in pipe["kind"]
    bare = describe_source(f"http://127.0.0.1:1/t-{{00000..09999}}.tar", samples_per_shard=10)
    assert (bare["shards"], bare["samples"]) == (10_000, 100_000)
