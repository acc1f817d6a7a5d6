"""Tests of xmc_toolkit.checkpoint: round trips, atomic layout, corruption detection, strict load."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from xmc_toolkit.checkpoint import (
    LATEST,
    MANIFEST,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_into_module,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    resolve_checkpoint,
    restore_rng_state,
    rng_state_to_tensors,
    save_checkpoint,
    unflatten_state,
)
from xmc_toolkit.encoder import SparseEncoder
from xmc_toolkit.errors import CheckpointError, ConfigError
from xmc_toolkit.output_layer import LabelTable


class Tiny(nn.Module):
    def __init__(self, L: int = 20) -> None:
        super().__init__()
        self.encoder = SparseEncoder(10, dim=4, hidden=(6,))
        self.labels = LabelTable(L, 4)


def _save(root, step, model=None, **extra):
    model = model or Tiny()
    tensors = {"model": model.state_dict(), **extra}
    return save_checkpoint(root, tensors, {"step": step, "labels": ["a", "b"], "lr": 0.1})


def test_round_trip_and_layout(tmp_path):
    torch.manual_seed(0)
    m = Tiny()
    ck = _save(tmp_path, 7, m)
    assert ck.name == "ckpt-00000007"
    assert (tmp_path / LATEST).read_text().strip() == ck.name
    assert sorted(p.name for p in ck.iterdir()) == ["manifest.json", "meta.json", "model.safetensors"]
    manifest = json.loads((ck / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "meta.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    tensors, meta = load_checkpoint(tmp_path)
    assert meta == {"step": 7, "labels": ["a", "b"], "lr": 0.1}
    m2 = Tiny()
    assert load_into_module(m2, tensors["model"]) == ([], [])
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    # loading one checkpoint directory directly works too
    t2, _ = load_checkpoint(ck, groups=["model"])
    assert set(t2) == {"model"}
    with pytest.raises(CheckpointError, match="no tensor group"):
        load_checkpoint(ck, groups=["optimizer"])


def test_keeps_previous_and_prunes(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000003", "ckpt-00000004"]
    assert resolve_checkpoint(tmp_path).name == "ckpt-00000004"
    assert not list(tmp_path.glob(".ckpt-*"))  # no staging leftovers
    ck = _save(tmp_path, 4)  # re-save the same step
    assert ck.name == "ckpt-00000004" and len(list_checkpoints(tmp_path)) == 2
    save_checkpoint(tmp_path / "k3", {"model": {}}, {"step": 1}, keep=3)
    for s in (2, 3, 4):
        save_checkpoint(tmp_path / "k3", {"model": {}}, {}, step=s, keep=3)
    assert len(list_checkpoints(tmp_path / "k3")) == 3


def _flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected_and_names_previous(tmp_path):
    _save(tmp_path, 1)
    ck = _save(tmp_path, 2)
    _flip_byte(ck / "model.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(tmp_path)
    msg = str(ei.value)
    assert "corrupt" in msg and "model.safetensors" in msg and "ckpt-00000001" in msg
    tensors, meta = load_checkpoint(tmp_path, fallback=True)
    assert meta["step"] == 1
    # without verification the flipped float loads (it is a data byte); verification is the guard
    load_checkpoint(tmp_path, verify=False)


def test_truncated_file_is_detected(tmp_path):
    ck = _save(tmp_path, 3)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"corrupt.*model.safetensors.*bytes.*no previous"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path, verify=False)


def test_meta_and_manifest_corruption(tmp_path):
    ck = _save(tmp_path, 1)
    (ck / "meta.json").write_text('{"step": 2}')
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(ck)
    (ck / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON"):
        load_checkpoint(ck)


def test_torn_write_without_manifest_is_ignored(tmp_path):
    _save(tmp_path, 1)
    torn = tmp_path / "ckpt-00000002"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    (tmp_path / LATEST).write_text("ckpt-00000002\n")  # pointer to the torn one
    assert resolve_checkpoint(tmp_path).name == "ckpt-00000001"
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_checkpoint(torn)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_save_errors(tmp_path):
    with pytest.raises(ConfigError, match="step"):
        save_checkpoint(tmp_path, {"model": {}}, {})
    with pytest.raises(ConfigError, match="keep"):
        save_checkpoint(tmp_path, {"model": {}}, {}, step=1, keep=0)
    with pytest.raises(CheckpointError, match="group names"):
        save_checkpoint(tmp_path, {"../x": {}}, {}, step=1)
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(tmp_path, {"model": {"a": 3}}, {}, step=1)
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, {"model": {}}, {"x": object()}, step=1)
    assert list_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".ckpt-*"))


def test_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    tensors = {"a": base, "b": base, "t": base.T, "row": base[1], "scalar": torch.tensor(5)}
    save_checkpoint(tmp_path, {"x": tensors}, {}, step=0)
    back, _ = load_checkpoint(tmp_path)
    for k, v in tensors.items():
        assert torch.equal(back["x"][k], v), k


def test_strict_load_lists_every_problem():
    m = Tiny(L=20)
    state = dict(Tiny(L=25).state_dict())
    del state["encoder.bag_bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as ei:
        load_into_module(m, state)
    msg = str(ei.value)
    assert "missing from the checkpoint: encoder.bag_bias" in msg
    assert "unexpected in the checkpoint: extra.weight" in msg
    assert "labels.weight.weight: checkpoint (25, 4) vs model (20, 4)" in msg
    assert "labels.bias.weight" in msg
    good = dict(Tiny(L=20).state_dict())
    del good["encoder.bag_bias"]
    good["extra"] = torch.zeros(1)
    missing, unexpected = load_into_module(m, good, strict=False)
    assert missing == ["encoder.bag_bias"] and unexpected == ["extra"]


@pytest.mark.parametrize("opt_name", ["Adam", "AdamW", "SparseAdam", "Adagrad"])
def test_optimizer_round_trip_continues_identically(tmp_path, opt_name):
    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        table = LabelTable(30, 4, sparse=opt_name in ("SparseAdam", "Adagrad"))
        kw = {"betas": (0.8, 0.95)} if opt_name != "Adagrad" else {}
        return table, getattr(torch.optim, opt_name)(table.parameters(), lr=0.05, **kw)

    def step(table, opt, seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(5, 4, generator=g)
        ids = torch.randint(0, 30, (5, 3), generator=g)
        opt.zero_grad()
        table.score_ids(q, ids).pow(2).sum().backward()
        opt.step()

    t1, o1 = make()
    for s in range(3):
        step(t1, o1, s)
    tensors, structure = optimizer_state_to_tensors(o1)
    save_checkpoint(tmp_path, {"model": t1.state_dict(), "optimizer": tensors},
                    {"step": 3, "optimizer_structure": structure})
    loaded, meta = load_checkpoint(tmp_path)
    t2, o2 = make()
    load_into_module(t2, loaded["model"])
    o2.load_state_dict(optimizer_state_from_tensors(loaded["optimizer"], meta["optimizer_structure"]))
    for s in range(3, 6):
        step(t1, o1, s)
        step(t2, o2, s)
    for k, v in t1.state_dict().items():
        assert torch.equal(v, t2.state_dict()[k]), k


def test_flatten_state_round_trip():
    obj = {"a": [torch.ones(2), (1, 2.5, None)], 3: {"x": True, "t": torch.zeros(1, 2)}, "s": "str"}
    tensors, structure = flatten_state(obj)
    json.dumps(structure)
    back = unflatten_state(tensors, json.loads(json.dumps(structure)))
    assert back["a"][1] == (1, 2.5, None) and back[3]["x"] is True and back["s"] == "str"
    assert torch.equal(back["a"][0], torch.ones(2)) and torch.equal(back[3]["t"], torch.zeros(1, 2))
    with pytest.raises(CheckpointError, match="cannot store"):
        flatten_state({"f": lambda: 1})
    with pytest.raises(CheckpointError, match="missing tensor"):
        unflatten_state({}, structure)


def test_rng_round_trip(tmp_path):
    tg = torch.Generator().manual_seed(3)
    ng = np.random.default_rng(4)
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    state = rng_state_to_tensors({"sampler": tg, "data": ng})
    expect = (torch.rand(3), torch.rand(2, generator=tg), np.random.rand(2), ng.random(2), random.random())
    save_checkpoint(tmp_path, {"rng": state}, {}, step=1)
    for _ in range(3):  # disturb everything
        torch.rand(5), torch.rand(5, generator=tg), np.random.rand(4), ng.random(3), random.random()
    loaded, _ = load_checkpoint(tmp_path)
    restore_rng_state(loaded["rng"], {"sampler": tg, "data": ng})
    got = (torch.rand(3), torch.rand(2, generator=tg), np.random.rand(2), ng.random(2), random.random())
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    np.testing.assert_array_equal(got[2], expect[2])
    np.testing.assert_array_equal(got[3], expect[3])
    assert got[4] == expect[4]
    with pytest.raises(CheckpointError, match="no state for generator 'other'"):
        restore_rng_state(loaded["rng"], {"other": torch.Generator()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_tensors_save_and_load_to_device(tmp_path):
    m = Tiny().cuda()
    save_checkpoint(tmp_path, {"model": m.state_dict(), "rng": rng_state_to_tensors()}, {"step": 1})
    tensors, _ = load_checkpoint(tmp_path, device="cuda")
    assert tensors["model"]["labels.weight.weight"].is_cuda
    m2 = Tiny().cuda()
    load_into_module(m2, tensors["model"])
    assert torch.equal(m2.labels.weight.weight, m.labels.weight.weight)
    restore_rng_state(tensors["rng"])


def test_disk_full_inside_safetensors_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)"): the writer turns
    it into the disk-full OutputError, leaves no staging folder and keeps the last checkpoint."""
    import safetensors.torch
    from safetensors import SafetensorError

    from xmc_toolkit.errors import OutputError

    root = tmp_path / "ck"
    first = save_checkpoint(root, {"model": {"w": torch.ones(3)}}, step=1)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError, match=r"disk is full.*previous checkpoint .*ckpt-00000001"):
        save_checkpoint(root, {"model": {"w": torch.zeros(3)}}, step=2)
    assert list_checkpoints(root) == [first]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no staging left
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(SafetensorError("bad dtype")))
    with pytest.raises(SafetensorError, match="bad dtype"):  # not an I/O error: unchanged
        save_checkpoint(root, {"model": {"w": torch.zeros(3)}}, step=3)
