"""DistillModule: the thin LightningModule around the knowledge graph."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distill.batch import Batch, RetrievalBatch
from distill.config.load import from_dict, to_dict
from distill.config.schema import Config
from distill.core.build import build_graph
from distill.core.check import checked, exact_accumulation
from distill.core.graph import KnowledgeGraph
from distill.distributed import average_gradients, world_size
from distill.errors import ConfigError
from distill.eval.retrieval import RetrievalRecall
from distill.training.checkpoint import frozen_prefixes, load_tolerant
from distill.training.gradcache import accumulate

MAX_SKIPPED_IN_A_ROW = 20
"""Under `trainer.nonfinite: skip`, this many non-finite steps in a row stop the run."""
NO_DECAY_HINTS = ("bias", "norm", "ln_", "bn", "logit_scale", "temperature", "embeddings.position")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed weights and undecayed norms/biases/temperatures."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim < 2 or any(h in lowered for h in NO_DECAY_HINTS):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over `warmup` steps, cosine to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DistillModule(pl.LightningModule):
    """Trains the graph's students; evaluates retrieval with the `eval.model` encoders.

    Args:
        config: A validated config, or the plain dict saved in a checkpoint's hyperparameters.
        graph: A prebuilt graph (tests); built from the config when omitted.
    """

    def __init__(self, config: Config | dict[str, Any], graph: KnowledgeGraph | None = None) -> None:
        super().__init__()
        self.config = checked(from_dict(config)) if isinstance(config, dict) else config
        self.save_hyperparameters({"config": to_dict(self.config)})
        self.graph = graph if graph is not None else build_graph(self.config)
        self._val: dict[str, list[Tensor]] = {}
        self._skipped = self._skipped_in_a_row = 0
        self.exact = exact_accumulation(self.config)
        """K > 1: each loader batch is K micro-batches accumulated exactly (`distill.training.gradcache`);
        the optimizer then steps here (manual optimization) rather than in Lightning's loop."""
        self.automatic_optimization = self.exact == 1

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As `nn.Module.load_state_dict`, except that frozen models' weights may be absent on
        either side: a teacher served by the output cache is not loaded (`distill.training.cache.store`), so
        a checkpoint of a cached run lacks it, and a cached run resumes from a live one."""
        return load_tolerant(super(), state_dict, frozen_prefixes(self.config, "graph."), strict=strict)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the torch RNG states: a resumed run then draws the same dropout masks."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        checkpoint["rng"] = {"cpu": torch.get_rng_state(), "cuda": cuda}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("rng")
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def nonfinite(self, out: dict[str, Tensor]) -> bool:
        """True when this step's loss is NaN or infinite on any rank (all ranks agree, so
        they stop or skip together). One scalar read per step: on a GPU a host sync, which
        the step's loss logging already costs."""
        bad = (~torch.isfinite(out["loss"].detach())).float().reshape(1)
        if world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item())

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        scheduled = self.graph.set_step(self.global_step)  # global_step: restored on resume
        n = len(batch)
        if self.exact > 1:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            bad: list[bool] = []
            with self._no_sync():  # K backward passes, then one average over the ranks
                out = accumulate(self.graph, batch, self.exact, self.manual_backward,
                                 stop=lambda o: bad.append(self.nonfinite(o)) or bad[-1])
            if bad[-1]:
                return self._skip_nonfinite(out, n)
            average_gradients([p for p in self.graph.parameters() if p.requires_grad])
            clip = self.config.trainer.gradient_clip_val
            if clip:
                self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            optimizer.step()
            self.lr_schedulers().step()
        else:
            out = self.graph(batch)
            if self.nonfinite(out):
                return self._skip_nonfinite(out, n)
        self._skipped_in_a_row = 0
        self._log_step(out, scheduled, n)
        return out["loss"]

    def _no_sync(self) -> AbstractContextManager[Any]:
        """DDP's reducer switched off: it would average after each of the K backward passes,
        and with `find_unused_parameters` it counts the nodes that the first pass (the losses
        on cached node outputs) leaves unused as reduced, so their gradients never meet."""
        model = self.trainer.strategy.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()

    def _skip_nonfinite(self, out: dict[str, Tensor], n: int) -> None:
        """Stop the run (`trainer.nonfinite: error`) or count a skipped step (`skip`)."""
        edges = ", ".join(f"{k[5:]}={float(v):.4g}" for k, v in out.items() if k.startswith("edge/"))
        if self.config.trainer.nonfinite != "skip":
            raise ConfigError(
                f"train: step {self.global_step}: the loss is {float(out['loss']):.4g} (edges: {edges}); "
                "stopped before updating the weights, the last checkpoint is intact "
                "(trainer.nonfinite=skip drops such steps instead)"
            )
        self._skipped += 1
        self._skipped_in_a_row += 1
        self.log("train/nonfinite_skipped", float(self._skipped), batch_size=n)
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise ConfigError(
                f"train: step {self.global_step}: {self._skipped_in_a_row} steps in a row had a non-finite "
                f"loss (edges: {edges}); stopped, the last checkpoint is intact"
            )
        return None  # Lightning skips backward and the optimizer step (manual mode: skipped above)

    def _log_step(self, out: dict[str, Tensor], scheduled: dict[str, float], n: int) -> None:
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=n)
        for key, value in out.items():
            if key.startswith("edge/"):
                self.log(f"train/{key}", value, batch_size=n)
        for name, loss in self.graph.losses.items():
            scale = getattr(loss, "logit_scale", None)
            if isinstance(scale, nn.Parameter) and self.graph.edges[name].enabled:
                self.log(f"train/temperature/{name}", 1.0 / scale.exp().item(), batch_size=n)
        for key, value in scheduled.items():  # train/weight/<edge>, train/temperature/<edge>, ...
            self.log(f"train/{key}", value, batch_size=n)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None and hasattr(data, "skipped_total"):
            self.log("train/skipped", float(data.skipped_total("train")), batch_size=n)

    def on_validation_epoch_start(self) -> None:
        self._val = {"image": [], "image_ids": [], "text": [], "text_image_ids": []}

    def validation_step(self, batch: RetrievalBatch, batch_idx: int) -> None:
        name = self.config.eval.model
        model = self.graph.models[name]
        pixel = batch.image_inputs[name]["pixel_values"]
        dtype = next(model.parameters()).dtype
        self._val["image"].append(model.encode_image(pixel.to(dtype)).float())
        text = batch.text_inputs[name]
        self._val["text"].append(model.encode_text(text["input_ids"], text["attention_mask"]).float())
        self._val["image_ids"].append(batch.image_ids)
        self._val["text_image_ids"].append(batch.text_image_ids)

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("image"):
            return
        metric = RetrievalRecall(chunk_size=self.config.eval.chunk_size).to(self.device)
        metric.update(
            torch.cat(self._val["image"]),
            torch.cat(self._val["image_ids"]),
            torch.cat(self._val["text"]),
            torch.cat(self._val["text_image_ids"]),
        )
        for key, value in metric.compute().items():
            self.log(f"val/{key}", float(value), prog_bar=key == "rsum", sync_dist=False)
        self._val = {}

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.config.optim
        optimizer = torch.optim.AdamW(
            param_groups(self.graph, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
        )
        total = self.config.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, o.warmup_steps, total, o.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
