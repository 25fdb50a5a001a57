"""The README's commands as written: every ``python -m vitrain.train ...`` line composes and passes every config check
(what ``--cfg job`` and the start of a run do), with the placeholders it names (DIR, ...) standing for real paths."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vitrain.config import compose, to_config

README = Path(__file__).resolve().parents[1] / "README.md"


def train_commands() -> list[str]:
    """The README's training command lines, without their comments and environment variables."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # HF_HUB_OFFLINE=1 python ...
            if line.startswith("python -m vitrain.train"):
                lines.append(line)
    return lines


def test_the_readme_has_training_commands() -> None:
    assert len(train_commands()) >= 15


@pytest.mark.parametrize("line", train_commands())
def test_each_readme_training_command_composes_and_passes_the_checks(line: str, tmp_path: Path) -> None:
    args = [a for a in shlex.split(line)[3:] if a not in ("-m", "--cfg", "job") and not a.startswith("hydra.")]
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    if any(a.startswith("experiment=digits_finetune") for a in args) and not any("checkpoint=" in a for a in args):
        args.append(f"model.checkpoint={tmp_path}/best.pt")
    sweep = [a for a in args if "," in a.partition("=")[2] and not a.partition("=")[2].startswith(("[", "'", '"'))]
    args = [a.split(",")[0] if a in sweep else a for a in args]  # a sweep's first run
    if "trainer.resume=auto" in args:
        args.remove("trainer.resume=auto")
    cfg = to_config(compose(args))
    assert cfg.trainer.epochs >= 1
