#!/usr/bin/env python3
"""ImageNet-style training for metaformer-zoo models, assembled from timm's factories.

Single process::

    python tools/train.py --recipe digits                         # the bundled default dataset (no download)
    python tools/train.py --recipe identityformer --model identityformer_s12 --data-dir /data/imagenet

More processes / GPUs / nodes with torchrun (DDP; NCCL on CUDA, Gloo on CPU)::

    torchrun --nproc_per_node=8 tools/train.py --recipe caformer --model caformer_s18 --data-dir /data/imagenet

Recipes are YAML files in configs/train/ (``--recipe NAME`` or ``--recipe path.yaml``) whose keys are this script's
argument names; a ``variants:`` mapping holds per-model overrides. Precedence: defaults < recipe < command line.
timm pieces used: create_dataset / create_loader (RandAugment, random erasing), Mixup/CutMix, create_optimizer_v2
(incl. layer decay), create_scheduler_v2, ModelEmaV3, CheckpointSaver, NativeScaler (AMP), ParseKwargs, resume.

``--sandwich N`` trains a mixer supernet (a model with ``sample_placements(n_random)``, e.g. ``zoo_supernet``) by the
sandwich rule: every step runs forward/backward once per sampled placement (the largest, the smallest and N random
ones, set with ``model.set_placement``), accumulating gradients, then takes one optimizer step; the largest
placement's detached softmax is the soft target (KL) of the others (in-place distillation).

``--resume OUTPUT/last.pth.tar`` continues a run exactly where it stopped. A run that already has ``--epochs`` epochs
is reported (epochs done, best top-1, its checkpoints) and nothing is trained or written. Resuming into another
``--output`` carries the run's best top-1 over and copies the checkpoint of that best epoch there as
``model_best.pth.tar`` (a later epoch replaces it only by beating it).

Distillation (timm's ``timm.task`` distillation tasks; the teacher is frozen in eval mode, only the student is
trained, saved and evaluated)::

    python tools/train.py --recipe digits --teacher zoo_metaformer \
        --teacher-checkpoint output/digits/model_best.pth.tar \
        --model-kwargs "token_mixers=['pooling', 'sepconv', 'hydra', 'hydra']" --distill-type soft --init-from-teacher

``--teacher`` is any zoo or timm model name; ``--teacher-checkpoint`` takes a tools/train.py checkpoint (its
``model_kwargs`` are reused when it was trained as the same model), a zoo / timm state dict or an official checkpoint
of a zoo family (converted by the family's filter); without it the teacher's pretrained weights are used.
``--init-from-teacher`` initialises the student from the teacher (``metaformer_zoo.transfer.transfer_mixers``).
"""
import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

import timm  # noqa: E402
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.task import DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TrainingTask  # noqa: E402
from timm.utils import (  # noqa: E402
    CheckpointSaver, ModelEmaV3, NativeScaler, ParseKwargs, accuracy, dispatch_clip_grad)
from timm.utils.checkpoint_saver import load_checkpoint_metadata  # noqa: E402
from timm.utils.model import get_state_dict, unwrap_model  # noqa: E402
from tqdm import tqdm  # noqa: E402

import metaformer_zoo  # noqa: E402,F401  (registers the zoo models)
from metaformer_zoo.checkpoint import CheckpointError, load_checkpoint_file, unwrap_state_dict  # noqa: E402
from metaformer_zoo.cli import model_kwarg  # noqa: E402,F401  (validate.py imports it from here too)
from metaformer_zoo.data import EVAL_SPLITS, find_split, prepare_digits  # noqa: E402
from metaformer_zoo.transfer import TransferError, transfer_mixers  # noqa: E402

_logger = logging.getLogger("train")
RECIPE_DIR = os.path.join(_REPO, "configs", "train")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("recipe / data")
    g.add_argument("--recipe", default=None, help="configs/train/<NAME>.yaml or a YAML path; with --help, the "
                                                  "defaults shown are the recipe's")
    g.add_argument("-c", "--config", default=None, help="extra YAML of argument defaults (applied after --recipe)")
    g.add_argument("--data-dir", default=None, help="ImageFolder root holding train/ and validation/ (or val/) "
                                                   "class folders; None: the bundled digits dataset")
    g.add_argument("--dataset", default="", help="timm dataset spec (e.g. torch/cifar10); empty: ImageFolder")
    g.add_argument("--train-split", default="train", help="training split folder under --data-dir")
    g.add_argument("--val-split", default="validation", help="held-out split folder under --data-dir "
                                                             "(val/ or eval/ are used when it is absent)")
    g.add_argument("--digits-size", type=int, default=64, help="side of the generated digits images")
    g.add_argument("--num-classes", type=int, default=None, help="classifier classes; None: the number of class "
                                                                 "folders in the training split (1000 otherwise)")
    g.add_argument("--img-size", type=int, default=None, help="input side; None: the model's default")
    g.add_argument("--crop-pct", type=float, default=None, help="eval center-crop fraction; None: the model's")
    g.add_argument("--interpolation", default="", help="eval resize interpolation; empty: the model's")
    g.add_argument("--train-interpolation", default="random", help="training resize interpolation")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean; None: the model's")
    g.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std; None: the model's")
    g.add_argument("-j", "--workers", type=int, default=2, help="data loader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="zoo_metaformer", help="timm model name (zoo models are registered)")
    g.add_argument("--model-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default=None,
                   metavar="KEY=VALUE", help="extra create_model kwargs (values are Python literals); replaces "
                                             "the recipe's model_kwargs")
    g.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    g.add_argument("--initial-checkpoint", default="", help="weights to start from (not a resume)")
    g.add_argument("--drop", type=float, default=0.0, help="classifier dropout rate")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate; None: the model's")
    g.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    g = p.add_argument_group("distillation (timm.task)")
    g.add_argument("--teacher", default=None, help="teacher model name (any zoo or timm model); None: no distillation")
    g.add_argument("--teacher-checkpoint", default="", help="teacher weights: a tools/train.py checkpoint, a zoo / "
                                                            "timm state dict or an official zoo-family checkpoint; "
                                                            "empty: the teacher's pretrained weights")
    g.add_argument("--teacher-kwargs", nargs="*", type=model_kwarg, action=ParseKwargs, default=None,
                   metavar="KEY=VALUE", help="create_model kwargs of the teacher; None: those recorded in a "
                                             "tools/train.py --teacher-checkpoint of the same model")
    g.add_argument("--distill-type", default="soft", choices=("soft", "hard", "feature"),
                   help="soft: KL on tempered logits (LogitDistillationTask); hard: cross-entropy on the teacher's "
                        "argmax; feature: MSE on pooled pre-logits features (FeatureDistillationTask)")
    g.add_argument("--distill-alpha", type=float, default=0.5, help="loss = (1 - alpha) * task loss + alpha * "
                                                                    "distillation loss")
    g.add_argument("--distill-tau", type=float, default=1.0, help="softmax temperature of --distill-type soft")
    g.add_argument("--init-from-teacher", action="store_true", help="initialise the student from the teacher "
                                                                    "(same skeleton; metaformer_zoo.transfer)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="epochs to train (a resume continues up to this)")
    g.add_argument("-b", "--batch-size", type=int, default=64, help="batch size per process")
    g.add_argument("--lr", type=float, default=None, help="absolute lr; None: lr_base * global_batch / lr_base_size")
    g.add_argument("--lr-base", type=float, default=1e-3, help="lr at --lr-base-size images per step")
    g.add_argument("--lr-base-size", type=int, default=1024, help="global batch size --lr-base refers to")
    g.add_argument("--opt", default="adamw", help="timm optimizer name (create_optimizer_v2)")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon; None: the optimizer's")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas; None: the optimizer's")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD-style momentum")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay; None: off")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping; None: off")
    g.add_argument("--sched", default="cosine", help="timm lr scheduler name (create_scheduler_v2)")
    g.add_argument("--warmup-epochs", type=int, default=1, help="linear warmup epochs")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at the start of warmup")
    g.add_argument("--min-lr", type=float, default=1e-5, help="lr floor of the schedule")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--sandwich", type=int, default=None, help="supernets: random placements per step besides the "
                   "largest and the smallest (in-place distillation from the largest); None: off")
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default=None, help="RandAugment spec, e.g. rand-m9-mstd0.5-inc1; None: off")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random-resized-crop area range")
    g.add_argument("--ratio", type=float, nargs=2, default=(3.0 / 4.0, 4.0 / 3.0),
                   help="random-resized-crop aspect ratio range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, default=0.4, help="color jitter strength")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha; 0: off")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha; 0: off")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g = p.add_argument_group("runtime")
    g.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, --amp-dtype on CUDA)")
    g.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"), help="autocast dtype on CUDA")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None,
                   help="torch.compile the model with this backend (inductor when given alone); None: eager")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (ModelEmaV3); it is "
                                                            "what gets evaluated and ranked")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per step")
    g.add_argument("--resume", default="", help="training checkpoint to continue (e.g. OUTPUT/last.pth.tar)")
    g.add_argument("--output", default="output/train", help="checkpoint / log directory")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default=None, help="cuda / cpu; None: cuda if available")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="truncate epochs (smoke tests); None: "
                                                                         "whole epochs")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--eval-only", action="store_true", help="evaluate the (resumed / initial) weights and exit")
    return p


def _recipe_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    path = os.path.join(RECIPE_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))
        raise SystemExit(f"unknown recipe {name!r}: no {path}. Recipes: {', '.join(known)}")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    """Defaults < recipe (+ its per-variant overrides) < --config < command line; checks the --data-dir layout."""
    parser = build_parser()
    # the files of defaults are read first, so --help shows the recipe's defaults and the recipe can pick the variant
    pre_parser = argparse.ArgumentParser(add_help=False)
    for flags in (("--recipe",), ("-c", "--config"), ("--model",)):
        pre_parser.add_argument(*flags, default=None)
    pre, _ = pre_parser.parse_known_args(argv)
    defaults: Dict = {}
    dests = {a.dest for a in parser._actions}
    for path in filter(None, [pre.recipe and _recipe_path(pre.recipe), pre.config]):
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        variants = data.pop("variants", {}) or {}
        data.pop("notes", None)
        model = pre.model or data.get("model", defaults.get("model"))
        data.update(variants.get(model, {}) or {})
        unknown = set(data) - dests
        if unknown:
            raise SystemExit(f"{path}: unknown keys {sorted(unknown)} (keys are tools/train.py argument names)")
        defaults.update(data)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.teacher is None and (args.teacher_checkpoint or args.init_from_teacher or args.teacher_kwargs):
        parser.error("--teacher-checkpoint / --teacher-kwargs / --init-from-teacher need --teacher NAME")
    if not 0.0 <= args.distill_alpha <= 1.0:
        parser.error(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if args.distill_tau <= 0:
        parser.error(f"--distill-tau must be > 0, got {args.distill_tau}")
    if args.data_dir is not None and not args.dataset:
        try:
            find_split(args.data_dir, args.train_split)
            args.val_split = find_split(args.data_dir, args.val_split, EVAL_SPLITS)
        except ValueError as e:
            parser.error(f"--data-dir: {e}")
    return args


def init_distributed(args):
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = args.world_size > 1
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        device = torch.device("cuda", args.local_rank)
    else:
        device = torch.device("cpu")
    if args.distributed:
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return device


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class TrainCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver storing plain data (args as a dict, the global step), so checkpoints load with
    ``torch.load(weights_only=True)`` and a resume continues at the same step."""

    def __init__(self, *a, extra_state=None, **kw):
        super().__init__(*a, **kw)
        self.extra_state = extra_state or (lambda: {})

    def _save(self, save_path, epoch, metric=None):
        state = {
            "epoch": epoch, "arch": self.args.model, "args": {k: v for k, v in vars(self.args).items()
                                                             if isinstance(v, (int, float, str, bool, list, tuple,
                                                                               dict, type(None)))},
            "optimizer": self.optimizer.state_dict(), "version": 2,
            "state_dict": get_state_dict(self.model, self.unwrap_fn),
        }
        if self.model_ema is not None:
            state["state_dict_ema"] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state["metric"] = metric
        state["saver"] = self.state_dict(epoch, metric)
        state.update(self.extra_state())
        torch.save(state, save_path)


class HardDistillationTask(LogitDistillationTask):
    """DeiT's hard-label distillation for a student with one head: cross-entropy against the teacher's argmax
    (timm has it only in ``TokenDistillationTask``, for students with a distillation token). Weights and teacher
    handling are LogitDistillationTask's; the temperature is not used."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        with torch.no_grad():
            teacher_logits = self.teacher(self.teacher.normalize_input(input, self.student_mean, self.student_std))
        kd_loss = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
        return dict(loss=self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss,
                    output=student_logits, task_loss=task_loss, kd_loss=kd_loss)


def build_teacher(args, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen teacher (eval mode, no grads) of ``--teacher`` with ``--teacher-checkpoint`` loaded strictly.

    A tools/train.py checkpoint of the same model lends its ``model_kwargs`` (unless --teacher-kwargs is given) and its
    EMA weights when it has them (as timm picks them); zoo models also accept their family's official layout (the
    family filter converts it); anything that does not fit exactly is an error and nothing is loaded."""
    kwargs, state = {}, None
    if args.teacher_checkpoint:
        try:
            ckpt = load_checkpoint_file(args.teacher_checkpoint)
            state = unwrap_state_dict(ckpt)
        except CheckpointError as e:
            raise SystemExit(f"--teacher-checkpoint: {e}") from e
        train_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        if train_args.get("model") == args.teacher:
            kwargs.update(train_args.get("model_kwargs") or {})
    if args.teacher_kwargs is not None:
        kwargs = dict(args.teacher_kwargs)
    try:
        teacher = timm.create_model(args.teacher, pretrained=state is None, num_classes=num_classes, **kwargs)
    except RuntimeError as e:  # unknown name (timm), weights that are not available
        raise SystemExit(f"--teacher {args.teacher}: {e}") from e
    if state is not None:
        try:
            teacher.load_state_dict(state, strict=True)
        except (CheckpointError, RuntimeError) as e:
            raise SystemExit(f"--teacher-checkpoint {args.teacher_checkpoint} does not fit --teacher {args.teacher} "
                             f"(num_classes={num_classes}, kwargs={kwargs}): {e}\nGive the teacher's create_model "
                             f"kwargs with --teacher-kwargs; nothing was loaded.") from e
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def build_distill_task(args, model: nn.Module, teacher: nn.Module, loss_fn: nn.Module, data_config: Dict,
                       device: torch.device, verbose: bool = True) -> TrainingTask:
    """timm's distillation task of ``--distill-type`` around the student ``model`` and the frozen ``teacher``.

    The student normalisation the task converts from is the loaders' (``data_config``), not the model's default."""
    teacher = DistillationTeacher(teacher, device=device)
    common = dict(student_model=model, teacher_model=teacher, criterion=loss_fn, device=device, verbose=verbose,
                  distill_loss_weight=args.distill_alpha, task_loss_weight=1.0 - args.distill_alpha)
    if args.distill_type == "soft":
        task = LogitDistillationTask(temperature=args.distill_tau, **common)
    elif args.distill_type == "hard":
        task = HardDistillationTask(**common)
    else:
        task = FeatureDistillationTask(**common)
    task.student_mean.copy_(torch.tensor(data_config["mean"]).view(1, -1, 1, 1))
    task.student_std.copy_(torch.tensor(data_config["std"]).view(1, -1, 1, 1))
    return task


def make_loaders(args, data_config, device):
    """Train / eval loaders; ``args.data_dir`` and ``args.val_split`` are resolved (parse_args, main) before."""
    val_split = args.val_split
    ds_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                              batch_size=args.batch_size, seed=args.seed)
    ds_eval = create_dataset(args.dataset, root=args.data_dir, split=val_split, is_training=False,
                             batch_size=args.batch_size)
    common = dict(input_size=data_config["input_size"], mean=data_config["mean"], std=data_config["std"],
                  num_workers=args.workers, distributed=args.distributed, device=device, use_prefetcher=False,
                  persistent_workers=False)
    loader_train = create_loader(
        ds_train, batch_size=args.batch_size, is_training=True, re_prob=args.reprob, re_mode=args.remode,
        scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, **common)
    loader_eval = create_loader(
        ds_eval, batch_size=args.batch_size, is_training=False, interpolation=data_config["interpolation"],
        crop_pct=data_config["crop_pct"], **common)
    return loader_train, loader_eval


def _num_classes(args) -> int:
    if args.num_classes:
        return args.num_classes
    if args.data_dir and not args.dataset:
        split = os.path.join(args.data_dir, args.train_split)
        if os.path.isdir(split):
            return len([d for d in os.listdir(split) if os.path.isdir(os.path.join(split, d))])
    return 1000


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, amp_ctx, loss_scaler,
                    model_ema, mixup_fn, step, task: Optional[TrainingTask] = None):
    """One epoch; with a distillation ``task`` the task computes the loss (``model`` is then the plain student)."""
    model.train()
    if task is not None:
        task.train()
    losses, n = 0.0, 0
    steps = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    progress = _progress(steps, f"epoch {epoch + 1}/{args.epochs}", args)
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        optimizer.zero_grad(set_to_none=True)
        if args.sandwich is not None:  # supernet: forward/backward per placement, then the optimizer step
            loss = sandwich_step(model, x, y, loss_fn, args, amp_ctx, loss_scaler, optimizer, step)
        else:
            with amp_ctx():
                loss = task(x, y)["loss"] if task is not None else loss_fn(model(x), y)
            params = task.get_clip_parameters() if task is not None else model.parameters()
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=params)
            else:
                loss.backward()
                if args.clip_grad is not None:
                    dispatch_clip_grad(params, args.clip_grad)
                optimizer.step()
        if model_ema is not None:
            model_ema.update(model, step=step)
        step += 1
        lr_scheduler.step_update(num_updates=step)
        losses += loss.item() * x.shape[0]
        n += x.shape[0]
        if progress is not None:
            progress.set_postfix(loss=f"{losses / n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            progress.update(1)
    if progress is not None:
        progress.close()
    total = torch.tensor([losses, n], dtype=torch.float64, device=device)
    if args.distributed:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item(), step


def sandwich_step(model, x, y, loss_fn, args, amp_ctx, loss_scaler, optimizer, step) -> torch.Tensor:
    """One supernet step (``--sandwich``): forward/backward per placement of ``sample_placements`` (largest first,
    seeded by the step so every DDP rank samples the same), the largest's detached softmax distilling into the others
    (KL), gradients accumulated, then one optimizer step. Returns the largest placement's loss."""
    net = unwrap_model(model)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    placements = net.sample_placements(args.sandwich, generator=gen)
    teacher, first = None, None
    for k, placement in enumerate(placements):
        net.set_placement(placement)
        # DDP: gradients accumulate locally and are all-reduced once, in the last placement's backward
        last = k == len(placements) - 1
        sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last \
            else contextlib.nullcontext()
        with sync:
            with amp_ctx():
                out = model(x)
                if teacher is None:
                    loss = loss_fn(out, y)
                else:
                    loss = nn.functional.kl_div(out.float().log_softmax(-1), teacher, reduction="batchmean")
            if teacher is None:
                teacher, first = out.detach().float().softmax(-1), loss.detach()
            if loss_scaler is not None:
                loss_scaler._scaler.scale(loss).backward()
            else:
                loss.backward()
    net.set_placement(placements[0])
    if loss_scaler is not None:
        if args.clip_grad is not None:
            loss_scaler._scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), args.clip_grad)
        loss_scaler._scaler.step(optimizer)
        loss_scaler._scaler.update()
    else:
        if args.clip_grad is not None:
            dispatch_clip_grad(model.parameters(), args.clip_grad)
        optimizer.step()
    return first


@torch.no_grad()
def evaluate(model, loader, device, args, amp_ctx) -> Dict[str, float]:
    """Loss / top-1 / top-5 over the held-out split; ``n`` is the number of distinct images evaluated (the padding
    timm's distributed eval sampler adds to even out the ranks is not counted)."""
    model.eval()
    crit = nn.CrossEntropyLoss(reduction="sum")
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    valid = getattr(loader.sampler, "num_valid_samples", None)  # padding comes last on each rank
    seen = 0
    for x, y in loader:
        if valid is not None:
            keep = max(0, valid - seen)
            seen += x.shape[0]
            if keep < x.shape[0]:
                x, y = x[:keep], y[:keep]
            if keep == 0:
                continue
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            out = model(x)
        top1, top5 = accuracy(out.float(), y, topk=(1, min(5, out.shape[-1])))
        b = x.shape[0]
        stats += torch.tensor([crit(out.float(), y).item(), top1.item() * b / 100, top5.item() * b / 100, b],
                              dtype=torch.float64, device=device)
    if args.distributed:
        torch.distributed.all_reduce(stats)
    loss, c1, c5, n = stats.tolist()
    return dict(loss=loss / n, top1=100 * c1 / n, top5=100 * c5 / n, n=int(n))


def _progress(total, desc, args):
    if args.no_progress or args.rank != 0:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def print_table(rows: List[Dict], file=None):
    file = sys.stdout if file is None else file  # resolved per call: sys.stdout may be replaced after import
    header = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time_s"]
    print("| " + " | ".join(header) + " |", file=file)
    print("|" + "|".join("---" for _ in header) + "|", file=file)
    for r in rows:
        print(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['top1']:.2f} | {r['top5']:.2f} "
              f"| {r['lr']:.2e} | {r['time_s']:.1f} |", file=file)


def _checkpoint_files(directory: str) -> List[str]:
    """The checkpoint files that really are in ``directory``."""
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory) if f.endswith(".pth.tar") and not f.startswith("tmp"))


def _best_row(history: List[Dict]) -> Dict:
    """The best epoch by top-1; ties keep the earlier epoch, like CheckpointSaver."""
    return max(history, key=lambda r: r["top1"])


def carry_best(saver: CheckpointSaver, resume_path: str, history: List[Dict]) -> Optional[str]:
    """Resuming into a new --output: make its model_best.pth.tar the best of the whole run, not of the epochs trained
    here. The best metric of the resumed history is carried into ``saver`` (a later epoch must beat it to replace the
    best file), and the file holding that best epoch (the source's model_best, its checkpoint-N or the resumed file)
    is copied to --output/model_best.pth.tar. Returns the copied file, or None when it is no longer on disk."""
    best = _best_row(history)
    saver.best_metric, saver.best_epoch = best["top1"], best["epoch"] - 1
    src_dir = os.path.dirname(os.path.abspath(resume_path))
    candidates = [resume_path, os.path.join(src_dir, "model_best.pth.tar"),
                  os.path.join(src_dir, f"checkpoint-{best['epoch'] - 1}.pth.tar")]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        meta = load_checkpoint_metadata(path)
        if meta.get("epoch") == best["epoch"] - 1 and meta.get("metric") == best["top1"]:
            shutil.copy2(path, os.path.join(saver.checkpoint_dir, "model_best.pth.tar"))
            return path
    return None


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("timm").setLevel(logging.WARNING)
    device = init_distributed(args)
    seed_everything(args.seed + args.rank)
    is_main = args.rank == 0
    if args.data_dir is None and not args.dataset:
        if is_main:  # rank 0 writes the digits once, the others then find them
            args.data_dir = prepare_digits(size=args.digits_size)
        if args.distributed:
            torch.distributed.barrier()
        args.data_dir = prepare_digits(size=args.digits_size)

    kwargs = dict(args.model_kwargs or {})
    if args.img_size and "img_size" not in kwargs and _accepts_img_size(args.model):
        kwargs["img_size"] = args.img_size
    model = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=_num_classes(args), drop_rate=args.drop,
        drop_path_rate=args.drop_path, checkpoint_path=args.initial_checkpoint or None, **kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config(vars(args), model=model, verbose=is_main)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    teacher = build_teacher(args, model.num_classes, device) if args.teacher else None
    if args.init_from_teacher and not args.resume:
        try:
            report = transfer_mixers(teacher, model)
        except TransferError as e:
            raise SystemExit(f"--init-from-teacher: {e}") from e
        if is_main:
            _logger.info(report.summary())

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                         num_classes=model.num_classes)
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    task = None
    if teacher is not None:
        if args.channels_last:
            teacher.to(memory_format=torch.channels_last)
        task = build_distill_task(args, model, teacher, loss_fn, data_config, device, verbose=is_main)

    if args.lr is None:
        args.lr = args.lr_base * args.batch_size * args.world_size / args.lr_base_size
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    # the task's trainable module: the student, plus the feature projection of --distill-type feature
    optimizer = create_optimizer_v2(task.trainable_module if task is not None else model, opt=args.opt, lr=args.lr,
                                    weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)

    amp_dtype = torch.bfloat16 if (args.amp_dtype == "bfloat16" or device.type == "cpu") else torch.float16
    amp_ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else contextlib.nullcontext
    loss_scaler = NativeScaler(device=device.type) if (args.amp and amp_dtype == torch.float16) else None

    start_epoch, step, history = 0, 0, []
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    if args.resume:
        start_epoch, step, history = resume(args.resume, model, optimizer, loss_scaler, model_ema, task)

    train_model = model
    device_ids = [args.local_rank] if device.type == "cuda" else None
    if args.sandwich is not None and not hasattr(model, "sample_placements"):
        raise ValueError(f"--sandwich trains mixer supernets (models with sample_placements, e.g. zoo_supernet); "
                         f"{args.model} has none: drop --sandwich")
    if args.sandwich is not None and task is not None:
        raise ValueError("--sandwich distils in place from the supernet's largest placement; it does not combine "
                         "with --teacher: drop one of them")
    if task is not None:  # the task compiles / wraps its trainable module, never the frozen teacher
        if args.torchcompile:
            task.compile(backend=args.torchcompile)
        if args.distributed:
            task.prepare_distributed(device_ids=device_ids)
    else:
        if args.torchcompile:
            train_model = torch.compile(model, backend=args.torchcompile)
        if args.distributed:  # a sandwich placement leaves the other candidates without gradients
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=device_ids, find_unused_parameters=args.sandwich is not None)

    loader_train, loader_eval = make_loaders(args, data_config, device)
    steps_per_epoch = len(loader_train) if args.max_steps_per_epoch is None else min(len(loader_train),
                                                                                        args.max_steps_per_epoch)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
        updates_per_epoch=steps_per_epoch)
    if start_epoch > 0:
        lr_scheduler.step(start_epoch, metric=None)

    if args.eval_only:
        metrics = evaluate(model, loader_eval, device, args, amp_ctx)
        if is_main:
            print(json.dumps(metrics))
        _finish(args)
        return metrics

    if args.resume and start_epoch >= num_epochs:  # nothing left to train: say so, write nothing
        metrics = {}
        if is_main:
            metrics = report_finished(args.resume, history, start_epoch, num_epochs)
        _finish(args)
        return metrics

    step_box = [step]
    saver, best_source = None, None
    if is_main:
        os.makedirs(args.output, exist_ok=True)
        saver = TrainCheckpointSaver(
            model, optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler, checkpoint_dir=args.output,
            recovery_dir=args.output, max_history=2,
            extra_state=lambda: dict(step=step_box[0], history=list(history),
                                     **({"task_state": task.get_task_state()} if task is not None else {})))
        if args.resume:
            _logger.info(f"resumed {args.resume}: {start_epoch}/{num_epochs} epochs done, continuing at epoch "
                         f"{start_epoch + 1}/{num_epochs}, step {step}")
            same_dir = os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) == os.path.realpath(
                args.output)
            if same_dir:
                saver.load_state_dict_from_checkpoint(args.resume)
            elif history:
                best_source = carry_best(saver, args.resume, history)
                best = _best_row(history)
                if best_source:
                    _logger.info(f"best so far: top-1 {best['top1']:.2f}% at epoch {best['epoch']}; copied "
                                 f"{best_source} to {os.path.join(args.output, 'model_best.pth.tar')}")
                else:
                    _logger.warning(f"best so far: top-1 {best['top1']:.2f}% at epoch {best['epoch']}, but no "
                                    f"checkpoint of that epoch is left next to {args.resume}; "
                                    f"{args.output}/model_best.pth.tar is written only by an epoch that beats it")

        n_params = sum(p.numel() for p in model.parameters())
        _logger.info(f"model {args.model}: {n_params / 1e6:.2f}M params; {len(loader_train.dataset)} train / "
                     f"{len(loader_eval.dataset)} val images from {args.data_dir}; {num_epochs} epochs x "
                     f"{steps_per_epoch} steps, lr {args.lr:.2e}, world size {args.world_size}, device {device}")
        if task is not None:
            n_teacher = sum(p.numel() for p in teacher.parameters())
            _logger.info(f"distilling from teacher {args.teacher} ({n_teacher / 1e6:.2f}M params, frozen, {args.teacher_checkpoint or 'pretrained weights'}): {type(task).__name__}, "
                         f"alpha {args.distill_alpha}, tau {args.distill_tau}")
    metrics = {}
    for epoch in range(start_epoch, num_epochs):
        # reseed per epoch: data order, augmentation, mixup and drop-path are a function of (seed, epoch), so a
        # resumed run continues exactly like an uninterrupted one
        seed_everything(args.seed + 1000 * epoch + args.rank)
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        t0 = time.time()
        train_loss, step = train_one_epoch(epoch, train_model, loader_train, optimizer, loss_fn, args, device,
                                           lr_scheduler, amp_ctx, loss_scaler, model_ema, mixup_fn, step, task)
        step_box[0] = step
        eval_model = model_ema.module if model_ema is not None else model
        metrics = evaluate(eval_model, loader_eval, device, args, amp_ctx)
        lr_scheduler.step(epoch + 1, metrics["top1"])
        row = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=metrics["loss"], top1=metrics["top1"],
                   top5=metrics["top5"], n=metrics["n"], lr=optimizer.param_groups[0]["lr"],
                   time_s=time.time() - t0, step=step)
        history.append(row)
        if is_main:
            _logger.info(f"epoch {epoch + 1}/{num_epochs}  step {step}  train_loss {train_loss:.4f}  "
                         f"val_loss {metrics['loss']:.4f}  top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  "
                         f"({row['time_s']:.1f}s)")
            saver.save_checkpoint(epoch, metric=metrics["top1"])
    if is_main and history:
        print()
        print_table(history)
        best = _best_row(history)
        out = os.path.abspath(args.output)
        print(f"\nfinal top-1 {history[-1]['top1']:.2f}% (best {best['top1']:.2f}% at epoch {best['epoch']}) on "
              f"{metrics['n']} held-out images; checkpoints in {out}: {', '.join(_checkpoint_files(out))}")
        with open(os.path.join(args.output, "summary.json"), "w") as f:
            json.dump(dict(model=args.model, history=history, final=history[-1],
                           best=dict(epoch=best["epoch"], top1=best["top1"], copied_from=best_source),
                           resumed_from=os.path.abspath(args.resume) if args.resume else None), f, indent=1)
    _finish(args)
    return metrics


def report_finished(resume_path: str, history: List[Dict], epochs_done: int, num_epochs: int) -> Dict:
    """The resumed checkpoint already finished the requested epochs: print where the run stands, train nothing."""
    src_dir = os.path.dirname(os.path.abspath(resume_path))
    files = ", ".join(_checkpoint_files(src_dir))
    if history:
        print_table(history)
        last, best = history[-1], _best_row(history)
        held_out = f" on {last['n']} held-out images" if "n" in last else ""
        print(f"\n{resume_path} is a finished run: {epochs_done}/{num_epochs} epochs done; final top-1 "
              f"{last['top1']:.2f}% (best {best['top1']:.2f}% at epoch {best['epoch']}){held_out}; checkpoints in "
              f"{src_dir}: {files}. Nothing trained; give a larger --epochs to train further.")
        metrics = dict(loss=last["val_loss"], top1=last["top1"], top5=last["top5"])
        if "n" in last:
            metrics["n"] = last["n"]
    else:
        print(f"{resume_path} is a finished run: {epochs_done}/{num_epochs} epochs done (no history recorded); "
              f"checkpoints in {src_dir}: {files}. Nothing trained; give a larger --epochs to train further.")
        metrics = {}
    return dict(metrics, finished=True, epochs_done=epochs_done)


def _finish(args):
    if args.distributed:
        torch.distributed.destroy_process_group()


def _accepts_img_size(name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def resume(path, model, optimizer, loss_scaler, model_ema, task: Optional[TrainingTask] = None
           ) -> Tuple[int, int, List[Dict]]:
    """Load a tools/train.py checkpoint into the training state (and the distillation task's own state, e.g. the
    feature projection); returns (epochs done, step, history)."""
    try:
        ckpt = load_checkpoint_file(path)
    except CheckpointError as e:
        raise SystemExit(f"--resume: {e}") from e
    for key in ("state_dict", "optimizer", "epoch"):
        if key not in ckpt:
            raise SystemExit(f"{path} is not a training checkpoint of tools/train.py (no {key!r}); use "
                             f"--initial-checkpoint for plain weights")
    unwrap_model(model).load_state_dict(ckpt["state_dict"])
    if task is not None:
        task.load_task_state(ckpt.get("task_state"))
    optimizer.load_state_dict(ckpt["optimizer"])
    if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
        loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    if model_ema is not None:
        if "state_dict_ema" in ckpt:
            model_ema.module.load_state_dict(ckpt["state_dict_ema"])
        else:  # the run had no EMA: start it from the resumed weights, not from the fresh init
            _logger.warning(f"{path} has no EMA weights; --model-ema starts from its weights")
            model_ema.set(model)
    return ckpt["epoch"] + 1, int(ckpt.get("step", 0)), list(ckpt.get("history", []))


if __name__ == "__main__":
    main()
