"""Host fine-tuning: head only, the last blocks, or everything with a lower backbone learning rate.

Writes ``RUN/model.safetensors`` (the whole network), ``RUN/run.json`` (backbone, classes, image size, settings) and
``RUN/metrics.json`` (loss and accuracy per epoch). Progress goes through a callback; nothing here prints.

Multi-process: the same call runs unchanged under ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on GPUs): each
process takes every N-th sample of the epoch's shuffled order (a ``DistributedSampler``) in batches of
``batch_size / N``, so one step of N processes sees the same images as one single-process step; the model is wrapped
in ``DistributedDataParallel``; metrics are summed over processes; only rank 0 writes files and reports progress.
``RUN/checkpoint.pt`` (rank 0, after every epoch) lets ``resume=True`` continue an interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetl.data import ImageFolder, load_image, scan_image_folder, stratified_split
from edgetl.errors import DataError
from edgetl.host.backbone import Backbone, build_backbone
from edgetl.preprocess import preprocess_image
from edgetl.registry import BackboneSpec, Preprocessing, get_backbone

FREEZE_MODES = ("head", "partial", "none")
#: AdamW on the backbone: the last blocks take a tenth of the classifier's rate; the whole network needs a hundredth
#: (at a tenth, every layer of MobileNetV2 trained on 800 digit images collapsed to chance within an epoch)
BACKBONE_LR_FACTOR = {"partial": 0.1, "none": 0.01}
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FinetuneConfig:
    model: str
    epochs: int = 3
    freeze: str = "head"
    lr: float = 3e-3
    #: backbone learning rate = lr x this; None: per mode (BACKBONE_LR_FACTOR)
    backbone_lr_factor: float | None = None
    partial_blocks: int = 3
    batch_size: int = 32
    image_size: int | None = None
    val_split: float = 0.2
    weight_decay: float = 1e-4
    seed: int = 0
    #: when the backbone trains too (partial / none): start from the linear probe, not a random classifier (LP-FT)
    linear_probe: bool = True


class _Images(torch.utils.data.Dataset):
    """Decodes and preprocesses on access with the shared preprocessing; light augmentation for training."""

    def __init__(self, folder: ImageFolder, indices: np.ndarray, pp: Preprocessing, augment: bool, seed: int):
        self.samples = [folder.samples[int(i)] for i in indices]
        self.pp = pp
        self.augment = augment
        self.seed = seed
        self.epoch = 0  # augmentation draws depend on (seed, epoch, sample) only: any process, resumed or not

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        x = preprocess_image(load_image(sample.path), self.pp)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if rng.random() < 0.5:
                x = x[:, :, ::-1]
            pad = max(1, self.pp.input_size // 16)  # random translation by up to 1/16 of the side
            padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            dy, dx = rng.integers(0, 2 * pad + 1, size=2)
            x = padded[:, dy:dy + self.pp.input_size, dx:dx + self.pp.input_size]
        return torch.from_numpy(np.ascontiguousarray(x)), sample.label


def _param_groups(model: Backbone, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Freeze per mode and return optimizer groups (backbone parameters at a lower learning rate)."""
    for p in model.features.parameters():
        p.requires_grad_(cfg.freeze == "none")
    if cfg.freeze == "partial":
        for block in model.blocks()[-cfg.partial_blocks:]:
            for p in block.parameters():
                p.requires_grad_(True)
    backbone = [p for p in model.features.parameters() if p.requires_grad]
    groups = [{"params": list(model.classifier.parameters()), "lr": cfg.lr}]
    if backbone:
        factor = cfg.backbone_lr_factor if cfg.backbone_lr_factor is not None else BACKBONE_LR_FACTOR[cfg.freeze]
        groups.append({"params": backbone, "lr": cfg.lr * factor})
    return groups


def _linear_probe(model: Backbone, folder: ImageFolder, indices: np.ndarray, pp: Preprocessing,
                  device: torch.device, seed: int, batch_size: int) -> None:
    """LP-FT (Kumar et al., ICLR 2022): set the new classifier to the softmax head fitted (numpy L-BFGS, as on the
    device) on the frozen features of the training images, so that fine-tuning the backbone starts from a good head.
    A random head sends large gradients into the pretrained layers and distorts them (seen here: full fine-tuning of
    MobileNetV2 on 800 digits stayed at chance for 3 epochs)."""
    from edgetl.heads import SoftmaxHead

    loader = torch.utils.data.DataLoader(_Images(folder, indices, pp, False, seed), batch_size=batch_size)
    model.eval()
    feats, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            feats.append(model.features(x.to(device)).cpu().numpy())
            labels.append(y.numpy())
    X, y = np.concatenate(feats), np.concatenate(labels)
    head = SoftmaxHead(seed=seed).fit(X, y)
    weight = head.coef_ / head.scale_  # undo the head's standardisation: logits = X @ weight.T + bias
    bias = head.intercept_ - weight @ head.mean_
    classes = model.classifier.weight.shape[0]
    full_w = np.zeros((classes, X.shape[1]), np.float32)
    full_b = np.full(classes, -30.0, np.float32)  # a class absent from the training part is never predicted
    full_w[:len(weight)], full_b[:len(bias)] = weight, bias
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(full_w))
        model.classifier.bias.copy_(torch.from_numpy(full_b))


def _freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm statistics fixed: small local data sets make poor batch statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    loss_sum, correct, n = _sum_over_ranks([loss_sum, correct, n], device)
    return loss_sum / max(n, 1), correct / max(n, 1)


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temporary file, then rename): an interrupted save leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: FinetuneConfig, classes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"cannot read checkpoint {path} ({exc}); delete it to start over") from exc
    if state.get("config") != json.loads(json.dumps(asdict(cfg))) or state.get("classes") != classes:
        raise DataError(f"checkpoint {path} was written for other settings or classes; resume with the same "
                        "options, or use another --out")
    return state


@dataclass
class _Training:
    """The network, what steps it, and the data it steps through."""

    model: Backbone
    net: nn.Module  #: the model, wrapped in DistributedDataParallel when several processes train
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: _Images
    sampler: torch.utils.data.DistributedSampler[Any]
    train_loader: torch.utils.data.DataLoader[Any]
    val_loader: torch.utils.data.DataLoader[Any]


@dataclass
class _Record:
    """The run so far: per-epoch metrics, the best score and weights, the first epoch still to train."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    first: int = 1
    resumed: bool = False

    def add(self, record: dict[str, float], model: nn.Module) -> None:
        self.history.append(record)
        score = record.get("val_accuracy", record["train_accuracy"])
        if score > self.best_acc:
            self.best_acc, self.best_state = score, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def finetune(data: str | os.PathLike[str], out: str | os.PathLike[str], cfg: FinetuneConfig,
             progress: Progress | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the ImageFolder ``data``; write the run to ``out``; return the metrics.

    Under ``torchrun`` every process calls this; rank 0 writes. ``resume``: continue from ``out/checkpoint.pt``
    (written after every epoch) when it exists."""
    if cfg.freeze not in FREEZE_MODES:
        raise DataError(f"unknown freeze mode {cfg.freeze!r}; use one of {', '.join(FREEZE_MODES)}")
    if cfg.epochs < 1:
        raise DataError(f"epochs must be at least 1, found {cfg.epochs}")
    rank, world, device = _distributed()
    progress = progress if (progress is not None and rank == 0) else (lambda stage, done, total: None)
    if cfg.batch_size % world:
        raise DataError(f"batch size {cfg.batch_size} does not split over {world} processes; pass a multiple of "
                        f"{world}")
    torch.manual_seed(cfg.seed)
    spec, pp = _image_backbone(cfg)
    folder = scan_image_folder(data)
    train_idx, val_idx = stratified_split(folder.labels, cfg.val_split, cfg.seed)
    if len(train_idx) == 0:
        raise DataError(f"{folder.root}: no training images left after the validation split")
    t = _setup(cfg, spec, pp, folder, train_idx, val_idx, rank, world, device)
    checkpoint = Path(out) / "checkpoint.pt"
    run = _resume(t, _load_checkpoint(checkpoint, cfg, list(folder.classes)) if resume else None)
    if not run.resumed and cfg.linear_probe and cfg.freeze != "head":
        _linear_probe(t.model, folder, train_idx, pp, device, cfg.seed, cfg.batch_size)
    start = time.perf_counter()
    for epoch in range(run.first, cfg.epochs + 1):
        record = _train_epoch(t, epoch, cfg.epochs, device, progress)
        if len(val_idx):
            record["val_loss"], record["val_accuracy"] = _evaluate(t.net, t.val_loader, device)
        run.add(record, t.model)
        if rank == 0:
            _save_checkpoint(checkpoint, {"epoch": epoch, "model": t.model.state_dict(), "optimizer":
                                          t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                                          "history": run.history, "best_acc": run.best_acc, "best_state":
                                          run.best_state, "torch_rng": torch.get_rng_state(), "config": asdict(cfg),
                                          "classes": list(folder.classes)})
    assert run.best_state is not None
    t.model.load_state_dict(run.best_state)
    summary = {"history": run.history, "best_val_accuracy": run.best_acc if len(val_idx) else None,
               "n_train": len(train_idx), "n_val": len(val_idx)}
    if rank != 0:
        return summary | {"rank": rank, "world_size": world}
    _write_run(Path(out), t.model, spec, pp, folder, cfg, train_idx)
    metrics = summary | {"seconds": round(time.perf_counter() - start, 2), "world_size": world,
                         "resumed_from_epoch": run.first - 1 if run.resumed else None}
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def _image_backbone(cfg: FinetuneConfig) -> tuple[BackboneSpec, Preprocessing]:
    """The registry entry of ``cfg.model`` (an image backbone) and its preprocessing at ``cfg.image_size``."""
    spec: BackboneSpec = get_backbone(cfg.model)
    if spec.modality != "image":
        raise DataError(f"{spec.id} is a {spec.modality} encoder; host fine-tuning covers image backbones only — export "
                        f"it as it is (edgetl export --model {spec.id}) and train a head on the device")
    pp = spec.preprocessing if cfg.image_size in (None, spec.preprocessing.input_size) else \
        spec.preprocessing.with_size(int(cfg.image_size))  # type: ignore[arg-type]
    return spec, pp  # type: ignore[return-value]


def _setup(cfg: FinetuneConfig, spec: BackboneSpec, pp: Preprocessing, folder: ImageFolder, train_idx: np.ndarray,
           val_idx: np.ndarray, rank: int, world: int, device: torch.device) -> _Training:
    """The network with a new classifier, its optimizer and cosine schedule, and the (distributed) data loaders."""
    model = build_backbone(spec)
    model.replace_classifier(len(folder.classes))
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    train_set = _Images(folder, train_idx, pp, True, cfg.seed)
    val_set = _Images(folder, val_idx, pp, False, cfg.seed)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size // world, sampler=sampler)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, sampler=torch.utils.data.
                                             DistributedSampler(val_set, world, rank, shuffle=False)
                                             if world > 1 else None)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Training(model, net, optimizer, scheduler, train_set, sampler, train_loader, val_loader)


def _resume(t: _Training, saved: dict[str, Any] | None) -> _Record:
    """The run so far: a fresh one, or the checkpoint's (weights, optimizer, schedule and RNG restored)."""
    if saved is None:
        return _Record()
    t.model.load_state_dict(saved["model"])
    t.optimizer.load_state_dict(saved["optimizer"])
    t.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return _Record(list(saved["history"]), float(saved["best_acc"]), saved["best_state"], int(saved["epoch"]) + 1,
                   resumed=True)


def _train_epoch(t: _Training, epoch: int, epochs: int, device: torch.device, progress: Progress) -> dict[str, float]:
    """One epoch over this process's share of the training images; loss and accuracy summed over processes."""
    t.net.train()
    _freeze_batchnorm(t.net)
    t.sampler.set_epoch(epoch)
    t.train_set.epoch = epoch
    loss_sum, correct, n = 0.0, 0, 0
    for step, (x, y) in enumerate(t.train_loader, 1):
        x, y = x.to(device), y.to(device)
        logits = t.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        t.scheduler.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        progress(f"epoch {epoch}/{epochs}", step, len(t.train_loader))
    loss_sum, correct, n = _sum_over_ranks([loss_sum, correct, n], device)
    return {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": correct / n}


def _write_run(out: Path, model: Backbone, spec: BackboneSpec, pp: Preprocessing, folder: ImageFolder,
               cfg: FinetuneConfig, train_idx: np.ndarray) -> None:
    """``out/model.safetensors`` (the whole network) and ``out/run.json`` (backbone, classes, preprocessing, settings,
    data, training images)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    run = {"backbone": spec.id, "classes": list(folder.classes), "preprocessing": pp.to_dict(),
           "config": asdict(cfg), "data": str(folder.root), "train_images": [str(folder.samples[i].path)
                                                                          for i in train_idx]}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")


def load_run(run: str | os.PathLike[str]) -> tuple[Backbone, BackboneSpec, Preprocessing, list[str]]:
    """Rebuild a fine-tuned network from a run folder: (model, registry spec, preprocessing, classes)."""
    from safetensors.torch import load_file

    run = Path(run)
    try:
        meta = json.loads((run / "run.json").read_text(encoding="utf-8"))
        state = load_file(str(run / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{run} is not a complete fine-tune run ({exc}); run `edgetl finetune … --out {run}`") from exc
    spec = get_backbone(meta["backbone"])
    model = build_backbone(spec, pretrained=False)
    model.replace_classifier(len(meta["classes"]))
    model.load_state_dict(state, strict=True)
    return model.eval(), spec, Preprocessing.from_dict(meta["preprocessing"]), list(meta["classes"])
