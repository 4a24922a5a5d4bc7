"""Host fine-tuning: head only, the last blocks, or everything with a lower backbone learning rate.

Writes ``RUN/model.safetensors`` (the whole network), ``RUN/run.json`` (backbone, classes, image size, settings) and
``RUN/metrics.json`` (loss and accuracy per epoch). Progress goes through a callback; nothing here prints.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FinetuneConfig:
    model: str
    epochs: int = 3
    freeze: str = "head"
    lr: float = 3e-3
    backbone_lr_factor: float = 0.1
    partial_blocks: int = 3
    batch_size: int = 32
    image_size: int | None = None
    val_split: float = 0.2
    weight_decay: float = 1e-4
    seed: int = 0


class _Images(torch.utils.data.Dataset):
    """Decodes and preprocesses on access with the shared preprocessing; light augmentation for training."""

    def __init__(self, folder: ImageFolder, indices: np.ndarray, pp: Preprocessing, augment: bool, seed: int):
        self.samples = [folder.samples[int(i)] for i in indices]
        self.pp = pp
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[i]
        x = preprocess_image(load_image(sample.path), self.pp)
        if self.augment:
            if self.rng.random() < 0.5:
                x = x[:, :, ::-1]
            pad = max(1, self.pp.input_size // 16)  # random translation by up to 1/16 of the side
            padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            dy, dx = self.rng.integers(0, 2 * pad + 1, size=2)
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
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor})
    return groups


def _freeze_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm statistics fixed: small local data sets make poor batch statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _evaluate(model: Backbone, loader: torch.utils.data.DataLoader) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return loss_sum / max(n, 1), correct / max(n, 1)


def finetune(data: str | os.PathLike[str], out: str | os.PathLike[str], cfg: FinetuneConfig,
             progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on the ImageFolder ``data``; write the run to ``out``; return the metrics."""
    if cfg.freeze not in FREEZE_MODES:
        raise DataError(f"unknown freeze mode {cfg.freeze!r}; use one of {', '.join(FREEZE_MODES)}")
    if cfg.epochs < 1:
        raise DataError(f"epochs must be at least 1, found {cfg.epochs}")
    progress = progress or (lambda stage, done, total: None)
    torch.manual_seed(cfg.seed)
    spec: BackboneSpec = get_backbone(cfg.model)
    pp = spec.preprocessing if cfg.image_size in (None, spec.preprocessing.input_size) else \
        spec.preprocessing.with_size(int(cfg.image_size))  # type: ignore[arg-type]
    folder = scan_image_folder(data)
    train_idx, val_idx = stratified_split(folder.labels, cfg.val_split, cfg.seed)
    if len(train_idx) == 0:
        raise DataError(f"{folder.root}: no training images left after the validation split")

    model = build_backbone(spec)
    model.replace_classifier(len(folder.classes))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    train_loader = torch.utils.data.DataLoader(_Images(folder, train_idx, pp, True, cfg.seed),
                                               batch_size=cfg.batch_size, shuffle=True,
                                               generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = torch.utils.data.DataLoader(_Images(folder, val_idx, pp, False, cfg.seed), batch_size=cfg.batch_size)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))

    history: list[dict[str, float]] = []
    best_acc, best_state = -1.0, None
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        _freeze_batchnorm(model)
        loss_sum, correct, n = 0.0, 0, 0
        for step, (x, y) in enumerate(train_loader, 1):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            progress(f"epoch {epoch}/{cfg.epochs}", step, len(train_loader))
        record = {"epoch": epoch, "train_loss": loss_sum / n, "train_accuracy": correct / n}
        if len(val_idx):
            record["val_loss"], record["val_accuracy"] = _evaluate(model, val_loader)
        history.append(record)
        score = record.get("val_accuracy", record["train_accuracy"])
        if score > best_acc:
            best_acc, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best_state is not None
    model.load_state_dict(best_state)

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    run = {"backbone": spec.id, "classes": list(folder.classes), "preprocessing": pp.to_dict(),
           "config": asdict(cfg), "data": str(folder.root), "train_images": [str(folder.samples[i].path)
                                                                          for i in train_idx]}
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    metrics = {"history": history, "best_val_accuracy": best_acc if len(val_idx) else None,
               "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
               "seconds": round(time.perf_counter() - start, 2)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


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
