"""models/: the arch registry, the encoder's shapes and view grouping, and the shared checkpoint format."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import (ARCHS, FrozenFeatures, build_encoder, encoder_from_checkpoint, list_checkpoints, load_checkpoint,
                    probe_features, save_checkpoint)
from models.batchnorm import GlobalBatchNorm1d, GlobalBatchNorm2d, globalise_batchnorm
from pipelines.spec import SPEC_PRESETS

torch.set_num_threads(2)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_registry_name_builds(arch):
    # On the meta device: builds the real timm graph (vit_h included) without allocating or running it.
    with torch.device("meta"):
        enc = build_encoder(arch, proj_dim=32, hidden_dim=64)
    assert enc.arch == arch and enc.is_vit == arch.startswith("vit_")
    assert enc.probe_dim == (2 * enc.feature_dim if enc.is_vit else enc.feature_dim)
    assert enc.projector[-1].out_features == 32


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown arch 'vit_zz'.*vit_t.*resnet50"):
        build_encoder("vit_zz")
    with pytest.raises(ValueError, match="patch_size"):
        build_encoder("resnet18", patch_size=8)


@torch.no_grad()
def test_vit_takes_seed_view_sizes_224_and_98():
    enc = build_encoder("vit_t", proj_dim=16, hidden_dim=32).eval()
    out = enc(torch.randn(1, 2, 3, 224, 224), torch.randn(1, 6, 3, 98, 98))
    assert out.global_emb.shape == (2, 1, 16) and out.all_emb.shape == (8, 1, 16)
    assert out.features.shape == (8, 1, 192)
    assert enc.patch_features(torch.randn(1, 3, 224, 224)).shape == (1, 16, 16, 192)  # patch 14
    assert enc.patch_features(torch.randn(1, 3, 98, 98)).shape == (1, 7, 7, 192)


@torch.no_grad()
def test_encoder_groups_views_by_resolution_and_keeps_view_order():
    torch.manual_seed(0)
    enc = build_encoder("vit_t", proj_dim=16, hidden_dim=32, patch_size=8, img_size=32).eval()
    g, loc = torch.randn(3, 2, 3, 32, 32), torch.randn(3, 4, 3, 16, 16)
    out = enc(g, loc)
    assert out.global_emb.shape == (2, 3, 16) and out.all_emb.shape == (6, 3, 16)
    assert torch.equal(out.global_emb, out.all_emb[:2])
    # view v of sample b is the backbone's output for exactly that image
    torch.testing.assert_close(out.features[1, 2], enc.backbone(g[2, 1:2])[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.features[2 + 3, 0], enc.backbone(loc[0, 3:4])[0], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_non_vit_counts_every_view_as_global():
    enc = build_encoder("resnet18", proj_dim=16, hidden_dim=32).eval()
    out = enc(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 3, 3, 16, 16))
    assert out.global_emb.shape == (5, 2, 16) and torch.equal(out.global_emb, out.all_emb)
    assert out.features.shape == (5, 2, 512)
    assert enc.probe_features(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert enc.patch_features(torch.randn(2, 3, 64, 64)).shape == (2, 2, 2, 512)


@torch.no_grad()
def test_vit_probe_features_are_two_cls_tokens_layernormed():
    enc = build_encoder("vit_t", proj_dim=16, hidden_dim=32, patch_size=8, img_size=32).eval()
    f = enc.probe_features(torch.randn(4, 3, 32, 32))
    assert f.shape == (4, enc.probe_dim) == (4, 384)
    torch.testing.assert_close(f.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


@torch.no_grad()
def test_probe_choices_match_an_independent_forward():
    """`seed`: CLS of the last two blocks (run block by block here, not through get_intermediate_layers) then
    LayerNorm; `pooled`: the CLS after the final norm; `projector`: the projector on the pooled features."""
    torch.manual_seed(0)
    enc = build_encoder("vit_t", proj_dim=16, hidden_dim=32, patch_size=8, img_size=32).eval()
    vit, x = enc.backbone, torch.randn(3, 3, 32, 32)
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outputs = []
    for block in vit.blocks:
        tokens = block(tokens)
        outputs.append(tokens)
    cls = torch.cat([outputs[-2][:, 0], outputs[-1][:, 0]], dim=-1)
    mean, var = cls.mean(-1, keepdim=True), cls.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(probe_features(vit, x, "seed"), (cls - mean) / torch.sqrt(var + 1e-5))
    pooled = vit.norm(outputs[-1])[:, 0]
    torch.testing.assert_close(probe_features(vit, x, "pooled"), pooled)
    torch.testing.assert_close(enc.probe_features(x, "projector"), enc.projector(pooled))
    torch.testing.assert_close(FrozenFeatures(vit, "projector", enc.projector).probe_features(x), enc.projector(pooled))
    resnet = build_encoder("resnet18", proj_dim=16, hidden_dim=32).eval().backbone
    assert torch.equal(probe_features(resnet, x, "seed"), resnet(x))  # no CLS token: seed = pooled
    with pytest.raises(ValueError, match=r"unknown probe 'cls'.*seed, pooled, projector"):
        probe_features(vit, x, "cls")
    with pytest.raises(ValueError, match="only a training checkpoint"):
        FrozenFeatures(vit, "projector")


def test_global_batchnorm_is_batchnorm_without_process_group():
    torch.manual_seed(0)
    ours, ref = GlobalBatchNorm1d(8), torch.nn.BatchNorm1d(8)
    x = torch.randn(16, 8) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def _bn_problem():
    """A small conv net with BatchNorm2d and BatchNorm1d (float64), and a batch of 8 images."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5), torch.nn.BatchNorm1d(5)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net, torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1


def _bn_worker(rank: int, world: int, tmp: str):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net, x = _bn_problem()
    globalise_batchnorm(net)
    model = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
    shard = len(x) // world
    out = model(x[rank * shard:(rank + 1) * shard])
    out.square().sum().backward()  # a sum over the batch: DDP's mean of gradients x world = full-batch grad
    buffers = {k: v for k, v in net.state_dict().items() if "running" in k}
    torch.save((out.detach(), [p.grad * world for p in net.parameters()], buffers), f"{tmp}/rank{rank}.pt")
    dist.barrier()
    os._exit(0)  # see tests/test_sigreg.py: skip gloo's racy C++ teardown


def test_global_batchnorm_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    net, x = _bn_problem()
    ref_out = net(x)
    ref_out.square().sum().backward()
    ref_grads = [p.grad for p in net.parameters()]
    ref_buffers = {k: v for k, v in net.state_dict().items() if "running" in k}
    assert isinstance(globalise_batchnorm(_bn_problem()[0])[1], GlobalBatchNorm2d)

    world = 2
    mp.spawn(_bn_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        out, grads, buffers = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out, ref_out[rank * 4:(rank + 1) * 4], rtol=1e-10, atol=1e-10)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)
        for k, v in buffers.items():  # running statistics: the same update on every rank
            torch.testing.assert_close(v, ref_buffers[k], rtol=1e-10, atol=1e-12, msg=k)


def test_globalise_batchnorm_keeps_parameters_and_statistics():
    net, x = _bn_problem()
    net.train()(x)  # running statistics away from their init
    before = {k: v.clone() for k, v in net.state_dict().items()}
    globalise_batchnorm(net)
    assert isinstance(net[1], GlobalBatchNorm2d) and isinstance(net[5], GlobalBatchNorm1d)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net.eval()
    ref, _ = _bn_problem()
    ref.load_state_dict(before)
    torch.testing.assert_close(net(x), ref.eval()(x))  # no process group: plain BatchNorm


def _config():
    return {"arch": "vit_t", "proj_dim": 16, "hidden_dim": 32, "patch_size": 8,
            "spec": SPEC_PRESETS["cpu-small"].replace(global_size=32).to_dict()}


def test_checkpoint_roundtrip_keep_last_k_and_truncated_fallback(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("vit_t", proj_dim=16, hidden_dim=32, patch_size=8, img_size=32)
    for step in (5, 10, 15, 20):
        save_checkpoint({"config": _config(), "model": enc.state_dict()}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint_000015.pt", "checkpoint_000020.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(tmp_path)["step"] == 20

    latest = list_checkpoints(tmp_path)[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a torn copy
    with pytest.warns(UserWarning, match=r"checkpoint_000020\.pt is truncated or corrupt"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == 15 and ckpt["path"].endswith("checkpoint_000015.pt")
    with pytest.raises(ValueError, match=r"checkpoint_000020\.pt is truncated or corrupt"):
        load_checkpoint(latest)  # a file asked for by name is not silently replaced

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored, cfg = encoder_from_checkpoint(tmp_path)
    assert cfg["arch"] == "vit_t"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(restored.probe_features(x), enc.eval().probe_features(x))


def test_checkpoint_rotation_spares_multiples_of_keep_every(tmp_path):
    state = {"config": _config(), "model": {}}
    for step in range(1, 11):
        save_checkpoint(state, tmp_path, step, keep=2, keep_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint_000004.pt", "checkpoint_000008.pt", "checkpoint_000009.pt", "checkpoint_000010.pt"]


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint_"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lejepa-ckpt/1 file"):
        load_checkpoint(tmp_path / "other.pt")
    save_checkpoint({"config": dict(_config(), arch="vit_zz"), "model": {}}, tmp_path, 1)
    with pytest.raises(ValueError, match="unknown arch 'vit_zz'"):
        load_checkpoint(tmp_path)
