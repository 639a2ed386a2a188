"""Staged training: a list of stages, each with its own edges, trainable parameters and length.

```yaml
stages:
  - {name: intra, edges: [si_ti, st_tt], max_steps: 300}
  - name: image
    edges: [si_st, kd, hn_i2t]
    train: ["models.student.image_*", "losses.*"]   # fnmatch over graph parameter names
    max_steps: 150
    lr: 1.0e-4                                        # default optim.lr
    build_index: student                              # (re)build the hn_i2t index first
```

`run_stages` runs stage i in `output_dir/stages/<i>_<name>/` (a normal run folder) with only the
stage's edges enabled. The stage starts from `init_from`: by default the previous stage's
`final.ckpt` (the first stage from the models as built), else an earlier stage's name, a
`.ckpt` path, or `config`. Tensors of frozen (teacher) models are not handed on; they load
from their own files. Parameters outside `train` keep their values, and submodules whose
parameters are all fixed run in eval mode (no dropout, no batch-norm statistics updates),
so a fixed tower's embeddings do not drift. A staged run is always resumable: a stage whose
`final.ckpt` and `metrics.json` exist is skipped (delete its folder to retrain it) and an
unfinished one resumes from its `checkpoints/last.ckpt`. When every stage is done, the last
stage's `final.ckpt` and `metrics.json` are copied to `output_dir`.
"""

from __future__ import annotations

import copy
import difflib
import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import nn

from distill.config.load import to_yaml
from distill.config.schema import Config
from distill.core.check import pattern_scope
from distill.distributed import is_rank_zero
from distill.errors import ConfigError
from distill.io import copy_file, write_text
from distill.negatives.mine import mine_negatives
from distill.negatives.refresh import hard_negative_edges
from distill.negatives.store import load_negatives, save_negatives
from distill.training.checkpoint import load_checkpoint, read_checkpoint
from distill.training.fit import fit
from distill.training.trainer import quiet_lightning


def stage_folder(config: Config, i: int) -> Path:
    """`output_dir/stages/<i>_<name>`."""
    return Path(config.output_dir) / "stages" / f"{i}_{config.stages[i].name}"


def finished(folder: Path) -> bool:
    """A run folder whose training completed (`final.ckpt` and `metrics.json` exist)."""
    return (folder / "final.ckpt").is_file() and (folder / "metrics.json").is_file()


def init_checkpoint(config: Config, i: int) -> Path | None:
    """The checkpoint stage i starts from, or None for the models as built."""
    init = config.stages[i].init_from
    if init == "config" or (init is None and i == 0):
        return None
    if init is None:
        return stage_folder(config, i - 1) / "final.ckpt"
    names = [s.name for s in config.stages[:i]]
    return stage_folder(config, names.index(init)) / "final.ckpt" if init in names else Path(init)


def stage_config(config: Config, i: int) -> Config:
    """The plain (stage-less) config stage i trains with."""
    stage = config.stages[i]
    cfg = copy.deepcopy(config)
    cfg.stages, cfg.output_dir, cfg.resume = [], str(stage_folder(config, i)), "last"
    for name, edge in cfg.edges.items():
        edge.enabled = name in stage.edges
    cfg.trainer.max_steps = stage.max_steps or config.trainer.max_steps
    if cfg.trainer.val_check_interval and cfg.trainer.val_check_interval > cfg.trainer.max_steps:
        cfg.trainer.val_check_interval = None
    cfg.optim.lr = stage.lr if stage.lr is not None else config.optim.lr
    if i < len(config.stages) - 1:
        cfg.save_pretrained = {}  # only the final student is exported
    return cfg


def pattern_problems(config: Config, graph: Any, first: int) -> list[str]:
    """Patterns of stages `first`.. that match no trainable parameter of `graph` (patterns
    about a model this graph did not load are left for their own stage)."""
    names = [n for n, _ in graph.named_parameters() if not (n.startswith("models.") and n.split(".")[1] in graph.frozen)]
    problems = []
    for i in range(first, len(config.stages)):
        for j, pattern in enumerate(config.stages[i].train):
            scope = pattern_scope(pattern)
            if scope and scope.startswith("models.") and scope.split(".")[1] not in graph.models:
                continue  # that model loads in its own stage, which checks the pattern then
            if i > first and scope is None:
                continue  # a wildcard head may be about a model a later stage loads
            if not any(fnmatchcase(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern, names, n=1)
                hint = f"; e.g. {close[0]!r}" if close else ""
                problems.append(f"stages[{i}].train[{j}]: pattern {pattern!r} matches no trainable parameter{hint}")
    return problems


def set_trainable(graph: Any, patterns: list[str]) -> int:
    """Train exactly the parameters matching `patterns` (among non-frozen models and enabled
    edges); return how many tensors train."""
    count = 0
    for name, p in graph.named_parameters():
        scope, owner = (name.split(".") + [""])[:2]
        if scope == "models":
            can = owner not in graph.frozen
        else:  # an edge's parameters (temperature, projection) train only while it is on
            can = scope != "losses" or graph.edges[owner].enabled
        p.requires_grad_(can and any(fnmatchcase(name, pat) for pat in patterns))
        count += p.requires_grad
    return count


def fixed_modules(graph: Any) -> list[nn.Module]:
    """The outermost submodules of trainable models whose parameters are all fixed."""
    out: list[nn.Module] = []
    covered: set[int] = set()
    for name, model in graph.models.items():
        if name in graph.frozen:
            continue
        for sub in model.modules():  # parents come before their children
            params = list(sub.parameters())
            if id(sub) not in covered and params and not any(p.requires_grad for p in params):
                out.append(sub)
                covered.update(id(m) for m in sub.modules())
    return out


class FixedInEval(pl.Callback):
    """Keep fixed submodules in eval mode: Lightning puts the whole module in train mode."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for m in self.modules:
            m.eval()


def load_weights(module: Any, path: Path, where: str) -> None:
    """Copy a checkpoint's tensors of trainable models and edges into `module`."""
    if not path.is_file():
        raise ConfigError(f"{where}: no such checkpoint {str(path)!r}")
    state = read_checkpoint(path).get("state_dict", {})
    frozen = {f"graph.models.{m}." for m in module.graph.frozen}
    own = {k for k in module.state_dict() if not k.startswith(tuple(frozen))}
    try:
        module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise ConfigError(f"{where}: {path} does not fit this stage's models: {detail}") from e


def remine_negatives(config: Config, i: int, module: Any, init: Path | None) -> None:
    """(Re)mine the negatives of every enabled hard_negative edge with `build_index`'s model,
    unless the file is newer than the stage's starting checkpoint and mined by that model."""
    model = config.stages[i].build_index
    if model not in module.graph.models:
        raise ConfigError(f"stages[{i}].build_index: model {model!r} is not loaded in this stage (no enabled edge reads it)")
    paths: dict[str, int] = {}
    for loss in hard_negative_edges(module.graph).values():
        paths[loss.index_path] = max(paths.get(loss.index_path, 0), loss.k)
    for path, k in paths.items():
        file = Path(path)
        if file.is_file() and (init is None or file.stat().st_mtime >= init.stat().st_mtime):
            if load_negatives(file)["model"] == model:
                continue
        print(f"stage {config.stages[i].name}: mining negatives of the training corpus with {model!r} -> {path}", flush=True)
        save_negatives(mine_negatives(module.graph.models[model], model, config.data, k=k), file)


def train(config: Config) -> tuple[dict[str, float], Any]:
    """What `distill fit` runs: every stage of a staged config, else one `fit`."""
    return run_stages(config) if config.stages else fit(config)


def run_stages(config: Config) -> tuple[dict[str, float], Any]:
    """Run (or resume) every stage of a staged config; see the module docstring.

    Returns:
        The last stage's validation metrics and its trained module (or, when every stage
        was already finished, the last stage's checkpoint read back as `Trained`).
    """
    quiet_lightning()
    out = Path(config.output_dir)
    if is_rank_zero():
        write_text(out / "config.yaml", to_yaml(config))
    module: Any = None
    metrics: dict[str, float] | None = None
    for i, stage in enumerate(config.stages):
        folder = stage_folder(config, i)
        if finished(folder):
            print(f"stage {i} {stage.name}: finished, skipped ({folder})", flush=True)
            module = metrics = None
            continue
        init = init_checkpoint(config, i)

        def prepare(m: Any, i: int = i, init: Path | None = init) -> list[pl.Callback]:
            problems = pattern_problems(config, m.graph, i)  # this stage's and the later ones'
            if problems:
                raise ConfigError(problems)
            if init is not None:
                load_weights(m, init, f"stages[{i}].init_from")
            if config.stages[i].build_index:
                remine_negatives(config, i, m, init)
            if not set_trainable(m.graph, list(config.stages[i].train)):
                raise ConfigError(f"stages[{i}].train: no parameter trains (the patterns match only fixed ones)")
            return [FixedInEval(fixed_modules(m.graph))]

        print(f"stage {i} {stage.name}: edges {', '.join(stage.edges)}; trains {', '.join(stage.train)}", flush=True)
        metrics, module = fit(stage_config(config, i), prepare=prepare)
    last = stage_folder(config, len(config.stages) - 1)
    if is_rank_zero():
        for name in ("final.ckpt", "metrics.json"):
            src, dst = last / name, out / name
            if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
                copy_file(src, dst)
    if metrics is None:
        metrics = json.loads((last / "metrics.json").read_text())
    return metrics, module if module is not None else load_checkpoint(last / "final.ckpt")
