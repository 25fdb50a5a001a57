"""Sharded checkpoints (vitrain/sharded.py) in one process: a DCP folder written and read back exactly, resharded
into a plain model, and hostile folders refused before anything in them runs. The 2-rank runs that write them are
in tests/test_fsdp.py."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from vitrain.checkpoint import newest
from vitrain.errors import VitrainError
from vitrain.models import create_model
from vitrain.sharded import LAST, check_metadata, load_sharded, save_sharded, tensors_of


def stepped(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = create_model("vit_nano_patch4_16", 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture(autouse=True)
def _quiet() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def test_a_sharded_save_loads_back_exactly_and_last_dcp_points_at_the_newest(tmp_path: Path) -> None:
    model, optimizer = stepped(0)
    for step in (1, 2):
        tensors, groups = tensors_of(model, optimizer, None)
        last = save_sharded(tensors, {"param_groups": groups, "step": step, "sharded": ["model", "optimizer"]},
                            tmp_path, step)
    assert last == tmp_path / LAST and os.readlink(last) == "dcp-step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp-step_00000002", LAST]  # keep_last=1
    assert newest(tmp_path) == last
    other, other_optimizer = stepped(1)
    rest = load_sharded(last, other, other_optimizer, None)
    assert rest["step"] == 2
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ours, theirs = optimizer.state_dict(), other_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for i, state in ours["state"].items():
        assert all(torch.equal(v, theirs["state"][i][k]) for k, v in state.items())


def test_a_hostile_or_foreign_sharded_folder_is_one_line_and_runs_nothing(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model, optimizer = stepped(0)
    tensors, groups = tensors_of(model, optimizer, None)
    folder = save_sharded(tensors, {"param_groups": groups, "step": 1, "sharded": ["model", "optimizer"]},
                          tmp_path / "run", 1)
    check_metadata(folder.resolve())  # DCP's own classes pass
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(VitrainError, match=r"refused, its .metadata names (posix|os)\.system, which could run code"):
        load_sharded(folder, *stepped(1), None)
    assert not marker.exists()
    dcp.save({"model": {"w": torch.ones(2)}, "extra": {"note": "a pickled object"}},
             checkpoint_id=tmp_path / "bytes")  # DCP pickles non-tensors, and would unpickle them on loading
    with pytest.raises(VitrainError, match=r"refused, it holds Python objects beyond tensors \(extra.note\)"):
        check_metadata(tmp_path / "bytes")
    (tmp_path / "bytes" / ".metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(VitrainError, match="is unreadable .* the folder is corrupt or incomplete"):
        check_metadata(tmp_path / "bytes")
    wide = create_model("vit_nano_patch4_16", 12)  # another number of classes
    with pytest.raises(VitrainError, match="does not match this model"):
        tensors, groups = tensors_of(model, optimizer, None)
        save_sharded(tensors, {"param_groups": groups, "step": 2, "sharded": ["model", "optimizer"]},
                     tmp_path / "ok", 2)
        load_sharded(tmp_path / "ok" / LAST, wide, torch.optim.AdamW(wide.parameters()), None)
