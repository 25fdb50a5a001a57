"""Bad values on the command lines of all five commands (train, evaluate, predict, visualize, export): wrong types,
numbers out of range (NaN and infinity among them), unknown and misspelt keys and group options, enumerated strings
no command takes, missing or wrong files, image sizes the patch does not divide. Each case ends its command with exit
code 1 and one line on stderr that starts with ``error: `` and names the key or the file, never a traceback.

A value that can be checked without data is refused before any data set is read: the training cases (and
evaluate's) ask for CIFAR-10 in an empty folder with no download, so a command that read its data would say
"cifar10 not found" instead; the cases that choose their data themselves (``data=...`` or ``data.root=...``) run as
written. A refused training run leaves no run folder. The inference commands take ``{ckpt}``, a real checkpoint of a
1-epoch run on digits, so that the bad value is the only fault of each case.

All the cases of a command run in one process (tests/cli_batch.py); the ids read as the command lines, with
``{name}`` for the files the fixture makes. An expected message ending in ``$`` is the whole line; the others are
its start.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_batch import run_cases

TRAIN = [
    # wrong types: a word, a fraction or a list for a number, a word for a bool, a scalar for a list
    ("trainer.epochs=abc", "error: trainer.epochs must be a whole number, got abc"),
    ("trainer.epochs=2.5", "error: trainer.epochs must be a whole number, got 2.5"),
    ("trainer.epochs=1e3", "error: trainer.epochs must be a whole number, got 1000.0"),
    ("trainer.epochs=true", "error: trainer.epochs must be a whole number, got True"),
    ("trainer.epochs=", "error: trainer.epochs must be a whole number, got"),
    ("trainer.epochs=null", "error: trainer.epochs cannot be null; give it a value"),
    ("seed=abc", "error: seed must be a whole number, got abc"),
    ("seed=-0.0", "error: seed must be a whole number, got -0.0"),
    ("data.hflip=maybe", "error: data.hflip must be true or false, got maybe"),
    ("data.hflip=1.5", "error: data.hflip must be true or false, got 1.5"),
    ("trainer.compile=si", "error: trainer.compile must be true or false, got si"),
    ("model.pretrained=2", "error: model.pretrained must be true or false, got 2"),
    ("optimizer.lr=fast", "error: optimizer.lr must be a number (such as 0.1 or 1e-3), got fast"),
    ("optimizer.lr=1e-3e", "error: optimizer.lr must be a number (such as 0.1 or 1e-3), got 1e-3e"),
    ("optimizer.lr=0x10", "error: optimizer.lr must be a number (such as 0.1 or 1e-3), got 0x10"),
    ("optimizer.lr=[0.1]", "error: optimizer.lr must be a number (such as 0.1 or 1e-3), got [0.1]"),
    ("optimizer.lr=null", "error: optimizer.lr cannot be null; give it a value"),
    ("trainer.grad_clip=high", "error: trainer.grad_clip must be a number (such as 0.1 or 1e-3), got high"),
    ("data.batch_size=[32,64]", "error: data.batch_size must be a whole number, got [32, 64]"),
    ("data.batch_size=1e12", "error: data.batch_size must be a whole number, got 1000000000000.0"),
    ("model.img_size=big", "error: model.img_size must be a whole number, got big"),
    ("data.mean=[a,b,c]", "error: data.mean must be a number (such as 0.1 or 1e-3), got ['a', 'b', 'c']"),
    ("data.scale=0.5", "error: data.scale must be a list in brackets (data.scale=[...]), got 0.5"),
    ("data.classes=3", "error: data.classes must be a list in brackets (data.classes=[...]), got 3"),
    ("optimizer.betas=0.9", "error: optimizer.betas must be a list in brackets (optimizer.betas=[...]), got 0.9"),
    ("model.lora.targets=qkv", "error: model.lora.targets must be a list in brackets (model.lora.targets=[...]), "
                               "got qkv"),
    ("data.num_workers=many", "error: data.num_workers must be auto or an integer >= 0 (0 loads in the main "
                              "process), got many"),
    ("trainer.channels_last=sometimes", "error: trainer.channels_last must be auto, true or false, got sometimes"),
    ("logger.mlflow.tags=team", "error: logger.mlflow.tags must be a mapping in braces (logger.mlflow.tags={...}), "
                                "got team"),
    ("model.lora=4", "error: model.lora is a group of keys"),
    ("trainer.resume=[a,b]", "error: trainer.resume must be one value, not a list"),
    ("-m trainer.epochs=1,abc", "error: trainer.epochs must be a whole number, got abc"),
    ("optimizer.lr=1e-3,5e-4", "error: optimizer.lr=1e-3,5e-4 is a sweep"),
    ("trainer.epochs=${oc.env:VITRAIN_NO_SUCH_VARIABLE}", "error: trainer.epochs"),
    # numbers out of range: negative, zero, NaN, infinity, huge
    ("trainer.epochs=-3", "error: trainer.epochs must be positive (at least 1), got -3"),
    ("trainer.epochs=inf", "error: trainer.epochs must be a whole number, got inf"),
    ("seed=4294967296", "error: seed must be in [0, 2**32 - 1] (NumPy's range), got 4294967296"),
    ("data.batch_size=-1", "error: data.batch_size must be positive, got -1"),
    ("optimizer.lr=0", "error: optimizer.lr must be positive, got 0.0"),
    ("optimizer.lr=-inf", "error: optimizer.lr must be positive, got -inf"),
    ("optimizer.lr=nan", "error: optimizer.lr must be "),
    ("optimizer.lr=inf", "error: optimizer.lr must be "),
    ("optimizer.weight_decay=nan", "error: optimizer.weight_decay must be >= 0, got nan"),
    ("optimizer.momentum=1", "error: optimizer.momentum must be in [0, 1), got 1.0"),
    ("optimizer.layer_decay=1.5", "error: optimizer.layer_decay must be in (0, 1], got 1.5"),
    ("optimizer.eps=0", "error: optimizer.eps must be positive, got 0.0"),
    ("optimizer.betas=[0.9]", "error: optimizer.betas must be 2 values in [0, 1) for adamw, got [0.9]"),
    ("scheduler.warmup_epochs=-1", "error: scheduler.warmup_epochs must be >= 0, got -1.0"),
    ("scheduler.warmup_epochs=nan", "error: scheduler.warmup_epochs must be >= 0, got nan"),
    ("scheduler.warmup_lr=1", "error: scheduler.warmup_lr=1 is above the peak learning rate 0.001"),
    ("scheduler.min_lr_ratio=nan", "error: scheduler.min_lr_ratio must be in [0, 1], got nan"),
    ("scheduler=step scheduler.decay_rate=0", "error: scheduler.decay_epochs must be positive and "
                                              "scheduler.decay_rate in (0, 1], got 10.0 and 0.0"),
    ("loss.label_smoothing=1", "error: loss.label_smoothing must be in [0, 1), got 1.0"),
    ("loss.label_smoothing=nan", "error: loss.label_smoothing must be in [0, 1), got nan"),
    ("data.re_prob=2", "error: data.re_prob is a probability: set it in [0, 1] (0 disables), got 2.0"),
    ("data.mixup=nan", "error: data.mixup must be >= 0 (0 disables), got nan"),
    ("data.mixup_prob=1.5", "error: data.mixup_prob is a probability: set it in [0, 1], got 1.5"),
    ("data.crop_pct=0", "error: data.crop_pct must be in (0, 1], got 0.0"),
    ("data.test_fraction=1", "error: data.test_fraction must be in (0, 1), got 1.0"),
    ("data.scale=[0.5,0.1]", "error: data.scale must be [min, max] with 0 < min <= max <= 1, got [0.5, 0.1]"),
    ("data.mean=[0.5,0.5] data.std=[0.2,0.2,0.2]", "error: data.mean and data.std need one value per channel each, "
                                                  "got [0.5, 0.5] and [0.2, 0.2, 0.2]"),
    ("data.std=[0.2,0.2,nan]", "error: data.std must be positive in every channel, got [0.2, 0.2, nan]"),
    ("data.num_workers=-1", "error: data.num_workers must be auto or an integer >= 0"),
    ("model.img_size=0", "error: model.img_size must be positive, got 0"),
    ("model.drop_path=inf", "error: model.drop_path is a rate: set it in [0, 1), got inf"),
    ("model.lora.rank=-1", "error: model.lora.rank must be >= 0 (0: no LoRA), got -1"),
    ("trainer.accum_steps=0", "error: trainer.accum_steps must be positive (at least 1), got 0"),
    ("trainer.ema_decay=nan", "error: trainer.ema_decay must be in (0, 1), got nan"),
    ("trainer.grad_clip=0", "error: trainer.grad_clip must be positive (or null to disable), got 0.0"),
    ("trainer.grad_clip=nan", "error: trainer.grad_clip must be positive (or null to disable), got nan"),
    ("trainer.max_skipped_fraction=1", "error: trainer.max_skipped_fraction must be in [0, 1), got 1.0"),
    ("distill.alpha=2", "error: distill.alpha must be in [0, 1] and distill.tau positive, got 2.0 and 1.0"),
    # enumerated strings no key takes
    ("trainer.precision=fp64", "error: unknown trainer.precision 'fp64'; choose auto, fp32, bf16 or fp16"),
    ("trainer.device=gpu", "error: trainer.device=gpu is not a device PyTorch knows; use auto, cpu, cuda or cuda:N"),
    ("trainer.strategy=zero3", "error: unknown trainer.strategy 'zero3'; choose one of auto, ddp, fsdp2"),
    ("trainer.dist_backend=mpi", "error: unknown trainer.dist_backend 'mpi'; choose one of auto, nccl, gloo"),
    ("data.crop_mode=stretch", "error: unknown data.crop_mode 'stretch'; choose one of center, squash, border"),
    ("data.interpolation=lanczos", "error: unknown data.interpolation 'lanczos'; choose one of bilinear, bicubic, "
                                   "nearest"),
    ("data.train_crop=random", "error: unknown data.train_crop 'random'; choose one of pad, rrc"),
    ("data.decode=gpu", "error: unknown data.decode 'gpu'; choose one of cpu, device"),
    ("model.source=keras", "error: unknown model source 'keras' (model.source); choose one of vitrain, timm, "
                           "torchvision"),
    ("loss.name=focal", "error: unknown loss 'focal' (loss.name); choose one of ce, bce"),
    ("distill.reduction=sum", "error: unknown distill.reduction 'sum'; choose one of batchmean, numel"),
    ("logger=wandb logger.wandb.mode=on", "error: unknown logger.wandb.mode 'on'; choose online, offline or disabled"),
    # misspelt group options
    ("model=vit_tinyy", "error: unknown model 'vit_tinyy'; did you mean vit_tiny? choose from deit, "),
    ("data=cifar1O", "error: unknown data 'cifar1O'; did you mean cifar10? choose from cifar10, cifar100, "),
    ("optimizer=adamz", "error: unknown optimizer 'adamz'; did you mean adamw? choose from adamw, lamb, lion, sgd"),
    ("scheduler=cosin", "error: unknown scheduler 'cosin'; did you mean cosine? choose from constant, cosine, step"),
    ("loss=focal", "error: unknown loss 'focal'; choose from bce, ce"),
    ("logger=[tensorboard,mlfow]", "error: unknown logger 'mlfow'; choose from mlflow, tensorboard, wandb"),
    ("distill=medium", "error: unknown distill 'medium'; choose from hard, none, soft"),
    ("experiment=deit_recipee", "error: unknown experiment 'deit_recipee'; did you mean deit_recipe? "),
    ("trainer=5", "error: unknown trainer '5'; choose from default"),
    # unknown and misspelt keys, with and without +
    ("trainer.epochz=3", "error: unknown key trainer.epochz; did you mean trainer.epochs?"),
    ("data.batchsize=8", "error: unknown key data.batchsize; did you mean data.batch_size, data.epoch_size?"),
    ("+optimizer.learning_rate=1", "error: unknown key optimizer.learning_rate; choose from optimizer.name, "
                                   "optimizer.lr, "),
    ("++loss.smooth=0.1", "error: unknown key loss.smooth; choose from loss.name, loss.label_smoothing, "),
    ("seeds=1", "error: unknown key seeds; did you mean seed, sweep?"),
    ("trainer.fsdp.cpu_ofload=true", "error: unknown key trainer.fsdp.cpu_ofload; did you mean "
                                     "trainer.fsdp.cpu_offload?"),
    ("model.lora.rnk=4", "error: unknown key model.lora.rnk; did you mean model.lora.rank?"),
    ("~trainer.epoch", "error: unknown key trainer.epoch; did you mean trainer.epochs?"),
    ("Trainer.epochs=3", "error: unknown key Trainer.epochs; did you mean trainer.epochs?"),
    ("+trainer.epochs=3", "error: trainer.epochs exists already; set it without the +: trainer.epochs=3"),
    ("+model.num_classes=3", "error: unknown key model.num_classes: vitrain sets it from the data set's classes"),
    ("trainer.epochs", "error: cannot parse the override 'trainer.epochs'"),
    ("trainer.epochs=[", "error: cannot parse the override 'trainer.epochs=['"),
    ("--epochs=3", "error: unknown option --epochs=3"),
    # keys that go together, or do not
    ("loss.bce_target_thresh=0.5", "error: loss.bce_target_thresh applies to loss.name=bce only, not ce; "),
    ("optimizer=sgd optimizer.betas=[0.9,0.99]", "error: optimizer.betas is not used by sgd; set optimizer.betas=null"),
    ("trainer.cache_features=true data.mixup=0.8", "error: trainer.cache_features trains the head on features "
                                                   "computed once: it cannot mix images"),
    ("model.lora.rank=4 trainer.freeze_backbone=true", "error: model.lora.rank > 0 trains only the adapters and the "
                                                       "head already; set trainer.freeze_backbone=false"),
    ("trainer.strategy=fsdp2 trainer.precision=fp16", "error: trainer.strategy=fsdp2 keeps bf16 or fp32 parameters, "
                                                      "not fp16; set trainer.precision=bf16"),
    ("logger.wandb.project=x", "error: logger.wandb.project is set but wandb is not a chosen logger; "),
    ("data.cache=true", "error: data.cache and data.decode=device read image files (imagefolder, filelist), "
                        "not cifar10"),
    ("data=hf", "error: data.path has no value; set it on the command line (data.path="),
    ("data=webdataset", "error: data.shards has no value; set it on the command line (data.shards="),
    # image sizes the patch (or Swin's window) does not divide
    ("model.img_size=31", "error: image size 31x31 is not divisible by the patch size 4; set model.img_size to a "
                          "multiple of it"),
    ("model=deit_small model.img_size=200", "error: image size 200x200 is not divisible by the patch size 16"),
    ("model=vit_tiny +model.patch_size=5 model.img_size=32", "error: image size 32x32 is not divisible by the patch "
                                                             "size 5"),
    ("model=swin_nano model.img_size=30", "error: image size 30x30 gives a 15x15 grid at stage 1"),
    # missing or wrong files
    ("trainer.resume={missing}", "error: trainer.resume={missing}: no such file; give a last.pt"),
    ("trainer.resume={text}", "error: trainer.resume={text} is not a PyTorch checkpoint (neither a zip archive nor "
                              "a pickle"),
    ("trainer.resume={empty_file}", "error: trainer.resume={empty_file} is not a PyTorch checkpoint"),
    ("trainer.resume={truncated}", "error: trainer.resume={truncated} "),
    ("model.checkpoint={missing}", "error: checkpoint {missing} does not exist; check the path"),
    ("model.checkpoint={folder}", "error: model.checkpoint={folder} is a folder without model.safetensors or "
                                  "pytorch_model.bin"),
    ("model.checkpoint={truncated}", "error: cannot load checkpoint {truncated}: "),
    ("distill=hard distill.teacher.name=resnet18 distill.teacher.checkpoint={missing}",
     "error: checkpoint {missing} does not exist; check the path"),
    ("data=imagefolder data.root={missing}", "error: no images under {missing}/train (data.root={missing})"),
    ("data=filelist data.train_list={missing}", "error: cannot read the file list {missing} (FileNotFoundError); "
                                                "give a CSV of path,label rows"),
]

EVALUATE = [
    ("checkpoint={ckpt} batch_size=0", "error: batch_size must be at least 1, got 0"),
    ("checkpoint={ckpt} batch_size=-1", "error: batch_size must be at least 1, got -1"),
    ("checkpoint={ckpt} batch_size=abc", "error: batch_size must be a whole number, got abc"),
    ("checkpoint={ckpt} batch_size=2.5", "error: batch_size must be a whole number, got 2.5"),
    ("checkpoint={ckpt} batch_size=null", "error: batch_size cannot be null; give it a value"),
    ("checkpoint={ckpt} device=tpu", "error: device=tpu is not a device PyTorch knows; use auto, cpu, cuda or cuda:N"),
    ("checkpoint={ckpt} device=cuda:x", "error: device=cuda:x is not a device PyTorch knows"),
    ("checkpoint={ckpt} img_size=0", "error: img_size must be null (the training size), test, or a positive whole "
                                     "number of pixels up to 8192, got 0$"),
    ("checkpoint={ckpt} img_size=abc", "error: img_size must be null (the training size), test, or a positive whole "
                                       "number of pixels up to 8192, got abc$"),
    ("checkpoint={ckpt} img_size=[16]", "error: img_size must be null (the training size), test, or a positive whole "
                                        "number of pixels up to 8192, got [16]$"),
    ("checkpoint={ckpt} img_size=2.5", "error: img_size must be "),
    ("checkpoint={ckpt} img_size=100000000000", "error: img_size"),
    ("checkpoint={ckpt} img_size=test", "error: {ckpt} records no test size"),
    ("checkpoint={ckpt} img_size=30", "error: image size 30x30 is not divisible by the patch size 4; set img_size to "
                                      "a multiple of it"),
    ("", "error: checkpoint has no value; set it on the command line (checkpoint=...)"),
    ("checkpoint=", "error: checkpoint has no value; set it on the command line (checkpoint=...)"),
    ("checkpoint=null", "error: checkpoint cannot be null; give it a value"),
    ("checkpoint={missing}", "error: checkpoint {missing} does not exist; check the path"),
    ("checkpoint={folder}", "error: checkpoint {folder} is a folder, not a checkpoint"),
    ("checkpoint={text}", "error: checkpoint {text} is not a PyTorch checkpoint"),
    ("checkpoint={truncated}", "error: cannot load checkpoint {truncated}: "),
    ("checkpoint={empty_file}", "error: cannot load checkpoint {empty_file}: the file is empty (0 bytes)"),
    ("checkpoint={ckpt} output={text}/eval.json", "error: cannot write to {text}/eval.json"),
    ("checkpoint={ckpt} output={folder}", "error: output={folder} is a folder"),
    ("checkpoint={ckpt} data.batch_size=0", "error: data.batch_size must be positive, got 0"),
    ("checkpoint={ckpt} data.crop_mode=fill", "error: unknown data.crop_mode 'fill'; choose one of center, squash, "
                                              "border"),
    ("checkpoint={ckpt} data=cifar10 data.root={empty} data.download=false data.name=mnist",
     "error: unknown data set 'mnist' (data.name); choose one of digits, cifar10, "),
    ("checkpoint={ckpt} data=imagenett", "error: unknown data 'imagenett'; did you mean imagefolder? choose from "),
    ("checkpoint={ckpt} data=imagefolder", "error: data.root has no value; set it on the command line (data.root="),
    ("checkpoint={ckpt} data=imagefolder data.root={empty}", "error: no images under {empty} (data.root={empty})"),
    ("checkpoint={ckpt} data.root={empty}", "error: data.root"),
    ("checkpoint={ckpt} +batchsize=3", "error: unknown key batchsize; did you mean batch_size?"),
    ("checkpoint={ckpt} Device=cpu", "error: unknown key Device; did you mean device?"),
    ("checkpoint={ckpt} format=onnx", "error: unknown key format; choose from checkpoint, data, batch_size, device, "
                                      "output, img_size$"),
]

PREDICT = [
    ("checkpoint={ckpt} inputs={image} topk=0", "error: topk must be at least 1, got 0"),
    ("checkpoint={ckpt} inputs={image} topk=-1", "error: topk must be at least 1, got -1"),
    ("checkpoint={ckpt} inputs={image} topk=abc", "error: topk must be a whole number, got abc"),
    ("checkpoint={ckpt} inputs={image} topk=2.5", "error: topk must be a whole number, got 2.5"),
    ("checkpoint={ckpt} inputs={image} topk=[1,2]", "error: topk must be a whole number, got [1, 2]"),
    ("checkpoint={ckpt} inputs={image} topk=null", "error: topk cannot be null; give it a value"),
    ("checkpoint={ckpt} inputs={image} format=xml", "error: unknown format 'xml'; choose json or csv"),
    ("checkpoint={ckpt} inputs={image} format=JSON", "error: unknown format 'JSON'; choose json or csv"),
    ("checkpoint={ckpt} inputs={image} format=onnx", "error: unknown format 'onnx'; choose json or csv"),
    ("checkpoint={ckpt} inputs={image} format=null", "error: format cannot be null; give it a value"),
    ("checkpoint={ckpt} inputs={image} ema=maybe", "error: ema must be true or false, got maybe"),
    ("checkpoint={ckpt} inputs={image} device=tpu", "error: device=tpu is not a device PyTorch knows"),
    ("checkpoint={ckpt}", "error: inputs has no value; set it on the command line (inputs=...)"),
    ("checkpoint={ckpt} inputs=null", "error: inputs cannot be null; give it a value"),
    ("checkpoint={ckpt} inputs={missing}", "error: no images at inputs={missing}; give an image file or a folder of "
                                           "images"),
    ("checkpoint={ckpt} inputs={empty}", "error: no images at inputs={empty}; give an image file or a folder of "
                                         "images"),
    ("checkpoint={ckpt} inputs={text}", "error: cannot read image {text} (UnidentifiedImageError); remove or replace "
                                        "the file"),
    ("checkpoint={ckpt} inputs={broken}", "error: cannot read image {broken} (UnidentifiedImageError); remove or "
                                          "replace the file"),
    ("inputs={image}", "error: checkpoint has no value; set it on the command line (checkpoint=...)"),
    ("checkpoint={missing} inputs={image}", "error: checkpoint {missing} does not exist; check the path"),
    ("checkpoint={folder} inputs={image}", "error: checkpoint {folder} is a folder, not a checkpoint"),
    ("checkpoint={truncated} inputs={image}", "error: cannot load checkpoint {truncated}: "),
    ("checkpoint={onnx} inputs={image}", "error: cannot load {onnx} as an ONNX model: "),
    ("checkpoint={image} inputs={ckpt}", "error: checkpoint {image} is not a PyTorch checkpoint"),
    ("checkpoint={ckpt} inputs={image} output={text}/out.json", "error: cannot write to {text}/out.json"),
    ("checkpoint={ckpt} inputs={image} output={folder}", "error: output={folder} is a folder"),
    ("checkpoint={ckpt} inputs={image} top_k=3", "error: unknown key top_k; did you mean topk?"),
    ("checkpoint={ckpt} +inpts={image}", "error: unknown key inpts; did you mean inputs?"),
]

VISUALIZE = [
    ("checkpoint={ckpt} image={image} head_fusion=median", "error: head_fusion=median is not one of mean, max, min"),
    ("checkpoint={ckpt} image={image} head_fusion=null", "error: head_fusion cannot be null; give it a value"),
    ("checkpoint={ckpt} image={image} discard_ratio=1", "error: discard_ratio=1.0 must be in [0, 1); 0 keeps every "
                                                        "attention weight"),
    ("checkpoint={ckpt} image={image} discard_ratio=-0.1", "error: discard_ratio=-0.1 must be in [0, 1)"),
    ("checkpoint={ckpt} image={image} discard_ratio=nan", "error: discard_ratio=nan must be in [0, 1)"),
    ("checkpoint={ckpt} image={image} discard_ratio=abc", "error: discard_ratio must be a number (such as 0.1 or "
                                                          "1e-3), got abc"),
    ("checkpoint={ckpt} image={image} dpi=0", "error: dpi must be positive, got 0"),
    ("checkpoint={ckpt} image={image} dpi=-1", "error: dpi must be positive, got -1"),
    ("checkpoint={ckpt} image={image} dpi=abc", "error: dpi must be a whole number, got abc"),
    ("checkpoint={ckpt} image={image} dpi=1.5", "error: dpi must be a whole number, got 1.5"),
    ("checkpoint={ckpt} image={image} ema=perhaps", "error: ema must be true or false, got perhaps"),
    ("checkpoint={ckpt} image={image} device=tpu", "error: device=tpu is not a device PyTorch knows"),
    ("checkpoint={ckpt}", "error: image has no value; set it on the command line (image=...)"),
    ("checkpoint={ckpt} image={missing}", "error: no image at image={missing}; give the path of an image file"),
    ("checkpoint={ckpt} image={folder}", "error: image={folder} is a folder; give one image file"),
    ("checkpoint={ckpt} image={text}", "error: cannot read image {text} (UnidentifiedImageError); give a PNG, JPEG "
                                       "or other image file"),
    ("checkpoint={ckpt} image={broken}", "error: cannot read image {broken} (UnidentifiedImageError)"),
    ("checkpoint={ckpt} image={image} out_dir={text}", "error: cannot write to {text}"),
    ("checkpoint={missing} image={image}", "error: checkpoint {missing} does not exist; check the path"),
    ("checkpoint={folder} image={image}", "error: checkpoint {folder} is a folder, not a checkpoint"),
    ("checkpoint={text} image={image}", "error: checkpoint {text} is not a PyTorch checkpoint"),
    ("checkpoint={truncated} image={image}", "error: cannot load checkpoint {truncated}: "),
    ("checkpoint={ckpt} image={image} +headfusion=max", "error: unknown key headfusion; did you mean head_fusion?"),
    ("checkpoint={ckpt} imagee={image}", "error: unknown key imagee; did you mean image?"),
]

EXPORT = [
    ("checkpoint={ckpt} format=tflite", "error: unknown format 'tflite' (format); choose one of onnx, torch.export, "
                                        "timm, safetensors"),
    ("checkpoint={ckpt} format=ONNX", "error: unknown format 'ONNX' (format); choose one of onnx, "),
    ("checkpoint={ckpt} format=null", "error: format cannot be null; give it a value"),
    ("checkpoint={ckpt} weights=best", "error: weights=best: choose one of auto, ema, raw"),
    ("checkpoint={ckpt} weights=ema", "error: weights=ema: {ckpt} has no EMA weights (trained without "
                                      "trainer.ema=true); use weights=raw"),
    ("checkpoint={ckpt} weights=null", "error: weights cannot be null; give it a value"),
    ("checkpoint={ckpt} opset=13", "error: opset must be >= 14, got 13"),
    ("checkpoint={ckpt} opset=0", "error: opset must be >= 14, got 0"),
    ("checkpoint={ckpt} opset=abc", "error: opset must be a whole number, got abc"),
    ("checkpoint={ckpt} opset=18.5", "error: opset must be a whole number, got 18.5"),
    ("checkpoint={ckpt} opset=99", "error: opset"),
    ("checkpoint={ckpt} atol=0", "error: atol must be positive, got 0.0"),
    ("checkpoint={ckpt} atol=-1", "error: atol must be positive, got -1.0"),
    ("checkpoint={ckpt} atol=nan", "error: atol must be positive, got nan"),
    ("checkpoint={ckpt} atol=abc", "error: atol must be a number (such as 0.1 or 1e-3), got abc"),
    ("", "error: checkpoint has no value; set it on the command line (checkpoint=...)"),
    ("checkpoint={missing}", "error: checkpoint {missing} does not exist; check the path"),
    ("checkpoint={folder}", "error: checkpoint {folder} is a folder, not a checkpoint"),
    ("checkpoint={text}", "error: checkpoint {text} is not a PyTorch checkpoint"),
    ("checkpoint={truncated}", "error: cannot load checkpoint {truncated}: "),
    ("checkpoint={empty_file}", "error: cannot load checkpoint {empty_file}: the file is empty (0 bytes)"),
    ("checkpoint={ckpt} output={text}/best.onnx", "error: cannot write to {text}/best.onnx"),
    ("checkpoint={ckpt} format=safetensors output={folder}", "error: output={folder} is a folder"),
    ("checkpoint={ckpt} +opsett=17", "error: unknown key opsett; did you mean opset?"),
    ("checkpoint={ckpt} dynamic=true", "error: unknown key dynamic; choose from checkpoint, format, output, weights, "
                                       "opset, atol$"),
]

COMMANDS = {"train": TRAIN, "evaluate": EVALUATE, "predict": PREDICT, "visualize": VISUALIZE, "export": EXPORT}
CASES = [(command, i) for command, table in COMMANDS.items() for i in range(len(table))]
EMPTY_CIFAR10 = ["data=cifar10", "data.root={empty}", "data.download=false"]  # read, it would say "cifar10 not found"


def fill(text: str, files: dict[str, str]) -> str:
    """``text`` with each ``{name}`` of ``files`` replaced by its path (``${...}`` interpolations stay)."""
    return re.sub(r"(?<!\$)\{(\w+)\}", lambda m: files.get(m.group(1), m.group(0)), text)


def command_line(command: str, args: str, index: int, root: Path) -> list[str]:
    """A case's arguments: the empty CIFAR-10 unless the case chooses its data (train, evaluate), and for train a
    run (and sweep) folder of its own."""
    given = args.split()
    if command in ("train", "evaluate") and not any(a.lstrip("+~").startswith(("data=", "data.root=")) for a in given):
        given = [*EMPTY_CIFAR10, *given]
    if command == "train":
        given += [f"hydra.run.dir={root}/run{index}", f"hydra.sweep.dir={root}/sweep{index}"]
    return given


def train_checkpoint(root: Path) -> Path:
    """``checkpoints/best.pt`` of a 1-epoch run of the default model on digits (a few seconds)."""
    run = subprocess.run([sys.executable, "-m", "vitrain.train", "trainer.epochs=1", "scheduler.warmup_epochs=0",
                          "data.batch_size=720", "trainer.progress=false", f"hydra.run.dir={root}/run"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "run" / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The wrong files the cases give (a folder, a text file, an empty one, a broken PNG, ...), a good image, and
    where the real checkpoint goes (made by ``results``, beside the training cases)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzz")
    for name in ("empty", "folder"):
        (root / name).mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "model.onnx").write_bytes(b"not an ONNX model")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "digit.png")
    return {"ckpt": str(root / "run" / "checkpoints" / "best.pt"), "missing": str(root / "no.pt"),
            "empty": str(root / "empty"), "folder": str(root / "folder"), "text": str(root / "notes.txt"),
            "empty_file": str(root / "empty.pt"), "truncated": str(root / "truncated.pt"),
            "broken": str(root / "broken.png"), "onnx": str(root / "model.onnx"), "image": str(root / "digit.png"),
            "root": str(root)}


@pytest.fixture(scope="module")
def results(files: dict[str, str]) -> dict[str, list[dict]]:
    """Every case through its command's real entry point, one process per command, two at a time: the training
    cases while the checkpoint trains, then the commands that read it."""
    root = Path(files["root"])

    def run(command: str) -> list[dict]:
        folder = root / command
        folder.mkdir()
        cases = [[fill(a, files) for a in command_line(command, args, i, folder)]
                 for i, (args, _) in enumerate(COMMANDS[command])]
        return run_cases(f"vitrain.{command}", cases, folder)

    with ThreadPoolExecutor(2) as pool:
        train = pool.submit(run, "train")
        ckpt = train_checkpoint(root)
        (root / "truncated.pt").write_bytes(ckpt.read_bytes()[:100_000])  # cut inside its zip archive
        rest = {command: pool.submit(run, command) for command in COMMANDS if command != "train"}
        return {"train": train.result(), **{command: future.result() for command, future in rest.items()}}


@pytest.mark.parametrize(("command", "index"), CASES, ids=[f"{c} {COMMANDS[c][i][0]}".strip() for c, i in CASES])
def test_a_bad_value_is_one_line_naming_it(command: str, index: int, files: dict[str, str],
                                           results: dict[str, list[dict]]) -> None:
    result = results[command][index]
    err, expected = result["stderr"].strip(), fill(COMMANDS[command][index][1], files)
    assert "Traceback" not in err, err
    assert result["code"] == 1 and len(err.splitlines()) == 1, err
    if expected.endswith("$"):
        assert err == expected[:-1]
    else:
        assert err.startswith(expected), err  # not "cifar10 not found": the value was checked before the data
    root = Path(files["root"])
    if command == "train":  # refused at start: the run folder Hydra made is taken away again
        assert not (root / "train" / f"run{index}").exists() and not (root / "train" / f"sweep{index}").exists()
    assert not any((root / "empty").iterdir())  # the empty CIFAR-10 folder stays empty: nothing was downloaded
