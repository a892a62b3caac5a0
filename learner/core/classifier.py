"""A trained classifier (either mode) with predict_proba, plus atomic save/load with JSON-able metadata."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from learner.core.backbone import Backbone, Normalisation, create_backbone
from learner.core.config import BackboneSpec, TrainMode
from learner.core.data import ImageSource, StainNormaliser, as_source
from learner.core.embeddings import embed, forward_batches, pooled_features, prepare_model, resolve_device
from learner.core.errors import LearnerError, ProgressFn, StopFn

FORMAT = "histoloop-learner/1"


class LinearHead(nn.Module):
    """Softmax regression on standardised embeddings: logits = ((x - mean) / scale) @ W.T + b."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.scale)


class BackboneWithHead(nn.Module):
    """Images -> logits for a head-mode classifier (used by Grad-CAM and image prediction)."""

    def __init__(self, body: nn.Module, head: LinearHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.body, x))


@dataclass
class Classifier:
    """What a training round produces. `network` is a LinearHead (mode "head", input = embeddings)
    or a full timm model (mode "finetune", input = images)."""

    mode: TrainMode
    class_names: list[str]
    spec: BackboneSpec
    normalisation: Normalisation
    image_size: int
    network: nn.Module
    weights_id: str  # of the pretrained backbone
    tta: bool = False  # head mode: trained on dihedral-TTA embeddings, so embed the same way
    version_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    extra: dict[str, Any] = field(default_factory=dict)
    _backbone: Backbone | None = field(default=None, repr=False)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "mode": self.mode,
            "class_names": list(self.class_names),
            "backbone": self.spec.to_dict(),
            "weights_id": self.weights_id,
            "normalisation": self.normalisation.to_dict(),
            "image_size": self.image_size,
            "tta": self.tta,
            "version_id": self.version_id,
            "extra": self.extra,
        }

    @property
    def embedding_id(self) -> str:
        """Cache namespace of this classifier's embeddings: the pretrained backbone's in head mode,
        its own after fine-tuning."""
        return self.weights_id if self.mode == "head" else f"ft-{self.version_id}"

    def backbone(self) -> Backbone:
        """The feature extractor whose embeddings this classifier consumes (head mode) or produces (finetune)."""
        if self._backbone is None:
            if self.mode == "head":
                bb = create_backbone(self.spec)
                if bb.weights_id != self.weights_id:
                    raise LearnerError(
                        f"The backbone weights found now ({bb.weights_id}) differ from those this head was "
                        f"trained on ({self.weights_id}); retrain the head or restore the original weights."
                    )
            else:
                bb = Backbone(
                    self.network, self.spec, self.embedding_id, self.normalisation, _num_features(self.network)
                )
            self._backbone = bb
        return self._backbone

    def embed(
        self,
        images: ImageSource | Sequence,
        *,
        keys: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        stain: StainNormaliser | None = None,
        cache_tag: str = "",
        device: str = "auto",
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> np.ndarray:
        return embed(
            self.backbone(),
            images,
            keys=keys,
            cache_dir=cache_dir,
            image_size=self.image_size,
            batch_size=batch_size,
            tta=self.tta,
            stain=stain,
            cache_tag=cache_tag,
            device=device,
            progress=progress,
            should_stop=should_stop,
        )

    def torch_module(self) -> nn.Module:
        """Images (normalised NCHW) -> logits, whatever the mode."""
        if self.mode == "finetune":
            return self.network
        assert isinstance(self.network, LinearHead)
        return BackboneWithHead(self.backbone().model, self.network)

    @torch.no_grad()
    def predict_proba(
        self,
        x: np.ndarray | ImageSource | Sequence,
        *,
        batch_size: int = 32,
        device: str = "auto",
        stain: StainNormaliser | None = None,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> np.ndarray:
        """Class probabilities (N, n_classes). A 2-D float array is taken as embeddings (head mode only);
        anything else as images (a sequence of PIL images or LazyImages)."""
        if isinstance(x, np.ndarray) and x.ndim == 2:
            if self.mode != "head":
                raise LearnerError("A fine-tuned classifier predicts from images, not from embeddings.")
            self.network.eval()
            head = self.network.cpu()
            logits = head(torch.from_numpy(np.asarray(x, dtype=np.float32)))
            return torch.softmax(logits.float(), dim=1).numpy()
        images = as_source(x)
        if self.mode == "head":
            emb = self.embed(images, batch_size=batch_size, stain=stain, device=device, progress=progress,
                             should_stop=should_stop)  # fmt: skip
            return self.predict_proba(emb)
        dev = resolve_device(device)
        model = prepare_model(self.network, dev)
        model.eval()
        return forward_batches(
            lambda t: torch.softmax(model(t).float(), dim=1),
            images,
            range(len(images)),
            image_size=self.image_size,
            normalisation=self.normalisation,
            batch_size=batch_size,
            device=dev,
            stain=stain,
            stage="predict",
            progress=progress,
            should_stop=should_stop,
        )


def _num_features(model: nn.Module) -> int:
    return int(getattr(model, "num_features", 0))


def save_model(path: str | Path, classifier: Classifier, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write weights + metadata to `path` atomically (temp file in the same folder, then os.replace).
    Returns the metadata written (JSON-serialisable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if extra:
        classifier.extra.update(extra)
    meta = classifier.metadata()
    state = {k: v.detach().cpu() for k, v in classifier.network.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"metadata": meta, "state_dict": state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LearnerError(f"No model file at {path}.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LearnerError(f"Could not read the model file {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("metadata", {}).get("format") != FORMAT:
        raise LearnerError(f"{path} is not a Histoloop model file ({FORMAT}).")
    return blob


def load_model(path: str | Path) -> Classifier:
    blob = _load(Path(path))
    meta, state = blob["metadata"], blob["state_dict"]
    class_names = list(meta["class_names"])
    spec = BackboneSpec(**meta["backbone"])
    norm = Normalisation(mean=tuple(meta["normalisation"]["mean"]), std=tuple(meta["normalisation"]["std"]))
    network: nn.Module
    if meta["mode"] == "head":
        weight = state["linear.weight"]
        network = LinearHead(weight.shape[1], weight.shape[0])
    else:
        network = timm.create_model(spec.name, pretrained=False, num_classes=len(class_names))
    network.load_state_dict(state)
    network.eval()
    return Classifier(
        mode=meta["mode"],
        class_names=class_names,
        spec=spec,
        normalisation=norm,
        image_size=int(meta["image_size"]),
        network=network,
        weights_id=meta["weights_id"],
        tta=bool(meta.get("tta", False)),
        version_id=meta["version_id"],
        extra=dict(meta.get("extra", {})),
    )
