"""Bad model files and a full disk (issue 6's catalogue; the data cases are in test_shard.py,
the params cases in test_params.py, kills and reproducibility in test_pipeline.py)."""
from __future__ import annotations

import errno
import pickle

import pytest
import torch
from conftest import Boom as _Boom, tiny_unet

from cmpipe.models import networks
from cmpipe.models.networks import CheckpointError, load_network, save_model
from cmpipe.util.fileio import atomic_save, atomic_savez, atomic_write_json


@pytest.fixture
def model_file(tmp_path):
    cfg, net = tiny_unet(1, seed=0)
    path = tmp_path / "model.pt"
    save_model(path, "edm_teacher", cfg, {"ema": net.state_dict()}, {"sigma_data": 0.5})
    return path


def test_truncated_model_file_names_the_file(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read model file {model_file}.*truncated, corrupt"):
        load_network(model_file, ("edm_teacher",))


def test_model_file_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "cmpipe-model-1", "kind": "edm_teacher", "payload": _Boom(str(marker))}, path)
    with pytest.raises(CheckpointError, match=rf"cannot read model file {path}"):
        load_network(path, ("edm_teacher",))
    assert not marker.exists()
    # a plain pickle (not a torch zip file) is refused the same way
    path.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match=rf"cannot read model file {path}"):
        load_network(path, ("edm_teacher",))
    assert not marker.exists()


def test_model_file_of_another_configuration_or_kind(model_file, tmp_path):
    ckpt = torch.load(model_file, weights_only=True)
    ckpt["unet"] = networks.unet_config([16, 32], 1, [], 0.0, 8, 1)   # weights of an 8/16 UNet
    bad = tmp_path / "other.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}: its weights do not fit its network configuration"):
        load_network(bad, ("edm_teacher",))
    with pytest.raises(CheckpointError, match=r"holds a 'edm_teacher' model; expected one of \['consistency'\]"):
        load_network(model_file, ("consistency",))
    torch.save({"weights": {}}, bad)
    with pytest.raises(CheckpointError, match="not a model saved by this pipeline"):
        load_network(bad, ("edm_teacher",))


def _disk_full_after(n_bytes: int):
    """A writer that writes `n_bytes` and then fails as a full disk does."""
    def write(f, data):
        f.write(data[:n_bytes])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


@pytest.mark.parametrize("writer", ["checkpoint", "json", "npz"])
def test_full_disk_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch, writer):
    path = tmp_path / "out" / {"checkpoint": "ckpt.pt", "json": "m.json", "npz": "s.npz"}[writer]
    write = {"checkpoint": lambda: atomic_save({"step": 1, "w": torch.ones(1000)}, path),
             "json": lambda: atomic_write_json(path, {"fid": [1.0] * 1000}),
             "npz": lambda: atomic_savez(path, images=torch.ones(1000).numpy())}[writer]
    write()
    before = path.read_bytes()

    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            return _disk_full_after(10)(self.f, bytes(data))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return FullDisk(f) if "w" in mode and str(file).endswith(".tmp") else f

    import builtins
    import pathlib

    def full_torch_save(obj, f):   # the real one writes through C++; this one fails like the disk
        f.write(b"PK\x03\x04" + b"x" * 100)

    monkeypatch.setattr(torch, "save", full_torch_save)
    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(pathlib.Path, "write_bytes",
                        lambda self, data: _disk_full_after(10)(real_open(self, "wb"), data))
    with pytest.raises(OSError, match=rf"no space left on the disk while writing {path}.*previous file.*intact"):
        write()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary file left
