"""How far vitrain's batched evaluation transform (in-memory data, the image cache) is from timm's per-image PIL
evaluation transform, in uint8 levels of the image before normalization. timm's ``create_transform`` (PIL resize
with antialiasing, center crop) is the reference; the batched path resizes the whole batch with torchvision's
tensor kernel. Prints the largest and mean gap and the share of pixel values that differ.

    python scripts/eval_path_gap.py --size 32 --img-size 224 --crop-pct 0.875 --interpolation bicubic
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

from vitrain.data.gpu import GpuAugment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="side of the (square) source images")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--crop-pct", type=float, default=0.875)
    parser.add_argument("--interpolation", default="bicubic")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.size, args.size, 3), dtype=np.uint8)
    zero, one = [0.0, 0.0, 0.0], [1 / 255] * 3  # "normalized" values are then uint8 levels
    timm_eval = create_transform(args.img_size, is_training=False, interpolation=args.interpolation,
                                 crop_pct=args.crop_pct, mean=zero, std=[1.0] * 3)
    reference = torch.stack([timm_eval(Image.fromarray(im)) * 255 for im in images])
    batched = GpuAugment(args.img_size, zero, one, False, interpolation=args.interpolation, crop_pct=args.crop_pct)
    ours = batched(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    gap = (ours - reference).abs()
    print(f"{args.images} images {args.size}x{args.size} -> {args.img_size}, crop_pct {args.crop_pct}, "
          f"{args.interpolation}: max gap {gap.max():.1f} uint8 levels, mean {gap.mean():.3f}, "
          f"{(gap > 0.5).float().mean():.2%} of values differ")


if __name__ == "__main__":
    main()
