import os
import pickle
import zipfile

import pytest
import torch

from dlbase.training import checkpoint
from dlbase.core.errors import CheckpointError


def payload(**extra):
    """A complete format-1 payload (checkpoint.Payload)."""
    return {"format_version": checkpoint.FORMAT_VERSION, "config": {"seed": 0}, "input_shape": [28, 28],
            "model": {"net.0.weight": torch.randn(3, 4)}, "optimizer": {"state": {}, "param_groups": [{}]},
            "epoch": 1, "step": 10, "steps_per_epoch": 10, "metrics": {},
            "best": {"metric": "val_accuracy", "value": 0.5, "epoch": 1, "bad_epochs": 0},
            "rng": {"torch": torch.get_rng_state(), "batcher": torch.Generator().get_state()}, **extra}


def test_round_trip_with_weights_only(tmp_path):
    p = tmp_path / "a.ckpt"
    data = payload(metrics={"val_accuracy": 0.5})
    checkpoint.save(p, data)
    raw = torch.load(p, weights_only=True)  # the safe loader opens it with no allow-list
    assert torch.equal(raw["model"]["net.0.weight"], data["model"]["net.0.weight"])
    got = checkpoint.load(p)
    assert got["epoch"] == 1 and torch.equal(got["rng"]["torch"], data["rng"]["torch"])
    assert os.listdir(tmp_path) == ["a.ckpt"]  # no temp files left behind


def test_save_replaces_atomically(tmp_path):
    p = tmp_path / "last.ckpt"
    checkpoint.save(p, payload(epoch=1))
    checkpoint.save(p, payload(epoch=2))
    assert checkpoint.load(p)["epoch"] == 2


def test_unwritable_folder_keeps_old_file(tmp_path):
    p = tmp_path / "last.ckpt"
    checkpoint.save(p, payload(epoch=1))
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(CheckpointError, match="cannot write checkpoint"):
            checkpoint.save(p, payload(epoch=2))
    finally:
        os.chmod(tmp_path, 0o700)
    assert checkpoint.load(p)["epoch"] == 1


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    Evil.marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    torch.save({"format_version": 1, "model": {}, "x": Evil()}, p)
    with pytest.raises(CheckpointError, match="refused: it asks to import posix.system"):
        checkpoint.load(p)
    assert not Evil.marker.exists()
    p.write_bytes(pickle.dumps(Evil()))  # a bare pickle, not a torch zip
    with pytest.raises(CheckpointError):
        checkpoint.load(p)
    assert not Evil.marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, os.urandom(4096), b"PK\x03\x04broken"])
def test_garbage_files(tmp_path, content):
    p = tmp_path / "bad.ckpt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        checkpoint.load(p)


def test_truncated_checkpoint(tmp_path):
    p = tmp_path / "t.ckpt"
    checkpoint.save(p, payload())
    data = p.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="t.ckpt"):
            checkpoint.load(p)


def test_wrong_format_and_future_version(tmp_path):
    p = tmp_path / "x.ckpt"
    torch.save({"weights": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="not a dlbase checkpoint"):
        checkpoint.load(p)
    torch.save(torch.zeros(3), p)
    with pytest.raises(CheckpointError, match="not a dlbase checkpoint"):
        checkpoint.load(p)
    checkpoint.save(p, payload(format_version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="newer than this dlbase reads"):
        checkpoint.load(p)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="directory"):
        checkpoint.load(tmp_path)


def test_strip_prefixes():
    sd = {"_orig_mod.net.0.weight": 1, "module.net.0.bias": 2, "net.2.weight": 3}
    assert checkpoint.strip_prefixes(sd) == {"net.0.weight": 1, "net.0.bias": 2, "net.2.weight": 3}


def test_write_failure_is_a_clear_error_even_as_root(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run folder should be")
    with pytest.raises(CheckpointError, match=r"not-a-dir/last.ckpt: cannot write checkpoint"):
        checkpoint.save(blocker / "last.ckpt", payload())
