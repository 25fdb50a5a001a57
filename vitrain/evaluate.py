"""``python -m vitrain.evaluate checkpoint=PATH [data=...]``: score a trained checkpoint.

Top-1/top-5, per-class accuracy, the confusion matrix (JSON, PNG and TensorBoard) and the images per second
of the evaluation loop, for the raw weights and the EMA weights when the checkpoint has them. The model and
the evaluation transform come from the checkpoint (:mod:`vitrain.inference`); ``data=...`` evaluates on
another data set with the same classes, written as ``eval_<checkpoint>_<data set>.json``: each data set keeps its
own results.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vitrain.cli import check_group_choices, check_override_keys, entry_point, run_command
from vitrain.config import CONFIG_DIR, EvaluateConfig, to_config
from vitrain.data.config import DataConfig
from vitrain.errors import ConfigError

log = logging.getLogger(__name__)


def evaluate_checkpoint(checkpoint: str | Path, data: DataConfig | None = None, batch_size: int = 256,
                        device: str = "auto", output: str | Path | None = None,
                        img_size: int | str | None = None) -> dict[str, Any]:
    """Score a checkpoint on its validation set (or on ``data``, preprocessed as the checkpoint says) and write
    ``eval_<checkpoint name>.json`` and ``.png`` beside it (``eval_<checkpoint name>_<data set>`` for ``data``:
    :func:`data_label`), or ``output`` and its ``.png``, and the figure into the run's TensorBoard. Where the default
    file holds another data set of the same label, it is refused, not overwritten. ``img_size``: evaluate at another
    size than the training one (``test``: the weights' test size; :func:`~vitrain.inference.load_trained`), which
    the file name and the JSON say (``eval_best_288.json``)."""
    from vitrain.data import build_datasets, cpu_eval_loader  # torch: once the command line has passed its checks
    from vitrain.figures import write_confusion
    from vitrain.inference import data_as_trained, data_label, load_trained, refuse_other_data
    from vitrain.metrics import score

    checkpoint = Path(checkpoint)
    trained = load_trained(checkpoint, device, img_size)
    own = data is None
    data = data or trained.data
    if data is None:
        raise ConfigError(f"{checkpoint} does not say which data it was trained on; give data=... (and its keys)")
    label, source = data_label(data)
    name = checkpoint.stem if own else f"{checkpoint.stem}_{label}"
    pre = trained.preprocess  # the model's own normalization and resize, whatever the data group says
    if trained.trained_size is not None:  # never silently: the file name and the JSON say the size
        name += f"_{pre['img_size']}"
        log.info("evaluating at %d px (img_size=%s); %s trained at %d: its position tables are resampled",
                 pre["img_size"], img_size, checkpoint.name, trained.trained_size)
    if not output:
        output = checkpoint.with_name(f"eval_{name}.json")
        refuse_other_data(output, source)
    output = Path(output)
    data = data_as_trained(data, pre)
    splits = build_datasets(data, pre["img_size"])
    if splits.class_names != trained.class_names:
        raise ConfigError(f"the data's classes {splits.class_names[:5]}... differ from the checkpoint's "
                          f"{trained.class_names[:5]}...; evaluate on data with the same classes")
    loader = cpu_eval_loader(splits.val, batch_size, data.workers)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "data": data.name, "data_source": source,
                              "img_size": pre["img_size"], "trained_img_size": trained.trained_size or pre["img_size"],
                              "class_names": splits.class_names, "model": score(trained.model, loader, trained.device)}
    if trained.ema is not None:
        result["model_ema"] = score(trained.ema, loader, trained.device)
    output.write_text(json.dumps(result, indent=2))
    write_confusion(result, f"{trained.spec['name']} on {label}", output.with_suffix(".png"),
                    checkpoint.parent.parent / "tb", name)
    return result



@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> float:
    """Print a short report; the JSON beside the checkpoint has everything."""

    def run() -> float:
        c = to_config(cfg, EvaluateConfig)
        result = evaluate_checkpoint(c.checkpoint, c.data, c.batch_size, c.device, c.output, c.img_size)
        for key in ("model", "model_ema"):
            if key in result:
                r = result[key]
                print(f"{key:9s} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  {r['images_per_sec']:.0f} img/s  "
                      f"({r['images']} images of {result['data']} at {result['img_size']} px)")
        return result["model"]["top1"]

    return run_command(run)


@entry_point
def main() -> None:
    """``python -m vitrain.evaluate``: a misspelt key is one line naming the nearest keys; then the Hydra app."""
    check_group_choices(sys.argv[1:], CONFIG_DIR, groups=("data",))
    check_override_keys(sys.argv[1:], EvaluateConfig, CONFIG_DIR, groups=("data",))
    hydra_main()


if __name__ == "__main__":
    main()
