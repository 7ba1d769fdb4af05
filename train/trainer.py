"""The one training loop every recipe runs in, on accelerate.

Launch it as ``leaplm train CONFIG [overrides]`` or, on several processes,
``accelerate launch --config_file launch/accelerate/<name>.yaml -m leaplm.train CONFIG [overrides]``.

Two choices make runs reproducible across topologies and restarts:
- Data order is a pure function of (seed, optimizer step): step s uses the global samples
  [s*E, (s+1)*E) of a per-epoch permutation, E = micro_batch_size * grad_accum * processes.
  Resuming at step k therefore continues with exactly the samples of step k.
- The loss of a step is its summed loss over *all* its targets (every micro-batch, every
  rank) divided by their total count, so the same effective batch gives the same loss and
  gradients whatever the (micro_batch_size, grad_accum, processes) split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm.auto import tqdm

from leaplm.config import Config, ConfigError
from leaplm.models.addons import save_addons
from leaplm.models.noisy_weights import has_noisy_weights
from leaplm.ship import checkpoint as ckpt
from leaplm.ship.export import export_model, push, trained_parts
from leaplm.train.recipes import NOISE_SEED, Recipe, get_recipe, noise_seed
from leaplm.train.rollouts import model_fingerprint

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


class ProcessesDiverged(RuntimeError):
    """Processes that should hold one model hold different weights."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step run in this call
    eval_rows: list[dict] = field(default_factory=list)
    preempted: bool = False  # stopped early by SIGTERM, after saving a checkpoint at `steps`


class SetupInterrupted(SystemExit):
    """SIGTERM before the first step: exit with the status a SIGTERM kill gives (128 + 15)."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


class PreemptionFlag:
    """Turns SIGTERM (what SLURM and cloud schedulers send before they kill a job) into a flag.

    The loop checks it between optimizer steps, so the checkpoint it then writes holds a whole
    step: resuming from it continues the loss curve exactly. Any rank's signal stops every rank
    (the flag is summed over processes), since a checkpoint needs all of them.

    Until ``training`` is set, during setup (model build, rollouts: minutes, with nothing trained
    to save), the signal raises :class:`SetupInterrupted` at once instead: waiting for a first
    step would outlast the scheduler's grace period.
    """

    def __init__(self):
        self.raised = False
        self.training = False
        self._previous = None

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.training:
            raise SetupInterrupted()
        log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StepSampler:
    """Indices of the micro-batches of one optimizer step for one rank (see module docstring).

    With ``lengths`` given, each epoch's permutation is cut into windows of ``group_window``
    steps and each window is sorted by length, so a step holds samples of similar length and
    padding stays small; the order is still a pure function of (seed, epoch).
    """

    def __init__(self, n_samples: int, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int,
                 lengths: Sequence[int] | None = None, group_window: int = 32):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n_samples, micro_batch, grad_accum, world, rank, seed
        self.per_step = micro_batch * grad_accum * world
        self.lengths = torch.as_tensor(lengths) if lengths is not None else None
        self.group_window = group_window
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            if self.lengths is not None:
                window = self.per_step * self.group_window
                chunks = [c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in perm.split(window)]
                perm = torch.cat(chunks)
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def positions(self, step: int) -> list[list[int]]:
        """This rank's micro-batches of ``step`` as global positions in the run's sample stream."""
        starts = (step * self.per_step + (m * self.world + self.rank) * self.micro for m in range(self.accum))
        return [list(range(start, start + self.micro)) for start in starts]

    def index(self, position: int) -> int:
        """The dataset index of the sample at a global ``position``."""
        return int(self._perm(position // self.n)[position % self.n])

    def micro_batches(self, step: int) -> list[list[int]]:
        return [[self.index(pos) for pos in micro] for micro in self.positions(step)]


class RecipeForward(torch.nn.Module):
    """The recipe's loss as the forward of one module around the model: what the trainer prepares.

    DDP averages the gradients only of parameters used inside a forward of the module it wraps,
    run with gradients enabled. A recipe that runs a frozen base under ``no_grad`` and its trained
    heads on the output (draft heads, acceptance heads) would leave the heads' gradients
    unsynchronised if DDP wrapped only the model, and each process would train its own heads.
    Wrapping the whole loss puts every trained parameter inside the wrapped forward.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, cfg: Config):
        super().__init__()
        self.model = model
        self._loss, self._cfg = recipe.loss, cfg

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self._loss(self.model, batch, self._cfg)

    # FSDP wraps the decoder layers the model names, and DeepSpeed sizes ZeRO-3 buckets from its config.
    @property
    def _no_split_modules(self):
        return getattr(self.model, "_no_split_modules", None)

    @property
    def config(self):
        return self.model.config


def lr_lambda(cfg: Config):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


def apply_lora(model, cfg: Config, new_token_ids: list[int] | None = None):
    """Wrap ``model`` in a peft LoRA adapter; rows of ``new_token_ids`` stay fully trainable.

    Token rows a recipe added have no pretrained meaning, so a frozen embedding would leave them
    at their initialisation; peft's trainable tokens train just those rows.
    """
    from peft import LoraConfig, get_peft_model

    lora = cfg.model.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in lora.target_modules if m in present]
    if not targets:
        raise ValueError(f"model.lora.target_modules {lora.target_modules} match no module of this model")
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", trainable_token_indices=new_token_ids or None)
    return get_peft_model(model, peft_cfg)


# What a training run writes into its output_dir that a later run there would mix with. A
# config.yaml alone is a run stopped before its first step (it is rewritten), and rollouts/ is a
# cache keyed by its settings: neither is in the way.
RUN_FILES = ("metrics.jsonl", "checkpoints", "eval-step-*.json", "stage_done.json")


def previous_run(output_dir: Path) -> list[Path]:
    """The files an earlier run left in ``output_dir`` (none for a new or empty directory)."""
    found = sorted(p for pattern in RUN_FILES for p in Path(output_dir).glob(pattern))
    return [p for p in found if not p.is_dir() or any(p.iterdir())]


def delete_previous_run(output_dir: Path) -> None:
    found = previous_run(output_dir)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    if found:
        log.warning("train.overwrite=true: deleted the earlier run's %s in %s", ", ".join(p.name for p in found),
                    output_dir)


# Settings a resumed run may change: where and how often it saves, logs, evaluates and exports, and
# which of two decoders writing the same rollouts collects them. The others shaped the weights,
# optimizer state, lr schedule or data order that resume restores. A key ending in "." stands for
# its whole section.
CHANGEABLE_ON_RESUME = ("output_dir", "train.resume_from", "train.overwrite", "train.save_every", "train.keep_last",
                        "train.log_every", "train.torch_threads", "rollout.pick_faster", "logging.", "eval.",
                        "export.")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_changes(cfg: Config, checkpoint: Path) -> list[str]:
    """``key: old -> new`` for each setting of ``cfg`` that differs from the checkpoint's config.yaml
    and may not change on resume. ``train.max_steps`` may change only under a constant schedule:
    cosine and linear decay over max_steps, and the restored scheduler would switch curves mid-run."""
    old = _flatten(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    new = _flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))  # the same round trip the saved file took
    changeable = CHANGEABLE_ON_RESUME + (("train.max_steps",) if cfg.train.lr_schedule == "constant" else ())

    def shown(tree: dict, key: str) -> str:  # a key one config lacks: written by another leaplm version
        return repr(tree[key]) if key in tree else "(absent)"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(old.keys() | new.keys())
            if (key in old, old.get(key)) != (key in new, new.get(key))
            and not any(key == c or (c.endswith(".") and key.startswith(c)) for c in changeable)]


class MetricsLogger:
    """Rank-0 metrics to ``metrics.jsonl`` and wandb (offline unless WANDB_API_KEY is set).

    A run resumed at ``start_step`` replays the steps after it: the rows the interrupted run logged
    for them are dropped first, so each step appears once.
    """

    def __init__(self, cfg: Config, output_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        if enabled and self.path.is_file():
            self._drop_after(start_step)
        self.wandb = None
        if enabled and cfg.logging.wandb:
            if not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(output_dir), config=cfg.to_dict(),
                                    name=output_dir.name, resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def _drop_after(self, step: int) -> None:
        def kept(line: str) -> bool:
            try:
                return json.loads(line)["step"] <= step
            except json.JSONDecodeError:  # the torn last line of a killed run
                return False

        lines = self.path.read_text().splitlines(keepends=True)
        rows = [line for line in lines if kept(line)]
        if len(rows) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(rows))
            os.replace(tmp, self.path)  # a crash here leaves the old rows, never a truncated file

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.recipe: Recipe = get_recipe(cfg.recipe)
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        # find_unused_parameters: a step may leave a trained parameter unused on one process (a draft
        # head past a short batch's end); DDP then still reduces it, as zeros, instead of hanging.
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        # `accelerate launch` asks for FSDP or DeepSpeed through these variables; Accelerator(cpu=True)
        # ignores both without a word, so a sharded launch config on CPU must say what runs instead.
        plugins = (("FSDP", "FSDP"), ("DEEPSPEED", f"DeepSpeed ({os.environ.get('ACCELERATE_DEEPSPEED_CONFIG_FILE')})"))
        asked = [what for key, what in plugins if os.environ.get(f"ACCELERATE_USE_{key}", "").lower() == "true"]
        acc = self.accelerator
        if asked and acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED) and acc.is_main_process:
            log.warning("launch config asks for %s; on CPU this runs as %s: no sharding", " and ".join(asked),
                        f"plain DDP over {acc.state.backend}" if acc.num_processes > 1 else "one plain process")
        self.output_dir = Path(cfg.output_dir)
        self.model = None  # built by setup(), which fit() runs if it has not run yet
        self._deepspeed = self.accelerator.state.deepspeed_plugin is not None
        set_seed(cfg.seed)

    # ----- Setup --------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        resume = self._claim_output_dir()
        if acc.is_main_process:
            if cfg.train.overwrite:
                delete_previous_run(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.output_dir / "config.yaml")
        model, self.tokenizer = self.recipe.build_model(cfg)
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and cfg.data.max_length > context:
            raise ValueError(
                f"data.max_length={cfg.data.max_length} is longer than the model's context "
                f"(max_position_embeddings={context}); lower data.max_length to at most {context}"
            )
        if has_noisy_weights(model) and (cfg.model.lora.r > 0 or cfg.model.gradient_checkpointing):
            raise ConfigError(
                "this run trains separate noisy weights (models/noisy_weights.py): full copies of the linear layers, "
                "whose stream roles are set only during the forward; set model.lora.r=0 and "
                "model.gradient_checkpointing=false"
            )
        if cfg.model.gradient_checkpointing:
            # non-reentrant: the reentrant variant marks parameters ready twice under DDP's unused-parameter search
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora.r > 0:
            new_tokens = self.recipe.new_token_ids(model) if self.recipe.new_token_ids else None
            model = apply_lora(model, cfg, new_tokens)
            for name in self.recipe.trained_in_full:
                model.get_base_model().get_submodule(name).requires_grad_(True)
        if self.recipe.rollout is not None:
            self.recipe.rollout(cfg, model, self.tokenizer, acc)
        self.samples: Sequence[dict] = self.recipe.build_dataset(cfg, self.tokenizer)
        self.collate = self.recipe.build_collator(cfg, self.tokenizer)
        self._configure_deepspeed()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      weight_decay=cfg.train.weight_decay)
        # What the card says the run trained, read before prepare (DeepSpeed may flatten parameters).
        self.trained = trained_parts(model, cfg.model.lora.r)
        self.model, self.optimizer = acc.prepare(RecipeForward(model, self.recipe, cfg), optimizer)
        self._base = None  # the frozen base's record (ship/checkpoint.py), made at the first save
        # A run with frozen weights saves only what trains (ship/checkpoint.py). Under DeepSpeed or FSDP,
        # which write their own model files and hold parameters flattened or sharded, it saves all.
        self._trained_only = (acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
                              and bool(ckpt.frozen_keys(self.unwrapped_model())))
        if self._trained_only:
            acc.register_save_state_pre_hook(self._drop_frozen_weights)
        # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would
        # step it once per process), and registered so checkpoints carry it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        acc.register_for_checkpointing(self.scheduler)
        lengths = [len(x["input_ids"]) for x in self.samples] if cfg.train.group_by_length else None
        self.sampler = StepSampler(len(self.samples), cfg.train.micro_batch_size, cfg.train.grad_accum,
                                   acc.num_processes, acc.process_index, cfg.seed, lengths)
        self.start_step = 0
        if resume is not None:
            self._resume(*resume)
        self.metrics = MetricsLogger(cfg, self.output_dir, acc.is_main_process, self.start_step)

    def _configure_deepspeed(self) -> None:
        """DeepSpeed runs accumulation and clipping inside its engine: hand it our values.

        accelerate fills the JSON's "auto" batch sizes only from a DataLoader, and the trainer
        has none (data order is the StepSampler's). With ``gradient_accumulation_steps`` set,
        the engine's ``step()`` (called by ``accelerator.backward`` after every micro-batch)
        updates the weights only at accumulation boundaries.
        """
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        t = self.cfg.train
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.micro_batch_size * t.grad_accum * self.accelerator.num_processes,
            "gradient_clipping": t.max_grad_norm,
        })

    def _claim_output_dir(self) -> tuple[Path, dict] | None:
        """Refuse a run that would mix with, or silently diverge from, what output_dir holds; return the
        checkpoint to resume from and its trainer state.

        Every rank decides from the files as they are before any is written (config.yaml, by the main
        process, comes after), and the ranks agree before going on: one refusing rank stops them all.
        """
        t = self.cfg.train
        resume, problem = None, None
        try:
            if t.resume_from:
                path = ckpt.resolve_resume(self.output_dir, t.resume_from)
                if path is None:
                    log.warning("train.resume_from=latest: no checkpoint in %s yet, starting from scratch",
                                self.output_dir)
                else:
                    resume = path, ckpt.validate(path)
                    self._check_resumable(path)
            elif not t.overwrite and (found := previous_run(self.output_dir)):
                raise ConfigError(
                    f"output_dir {self.output_dir} holds an earlier run ({', '.join(p.name for p in found)}); a new "
                    "run there would mix its metrics and checkpoints with that run's, and train.resume_from=latest "
                    "or `leaplm export` would pick whichever model has the highest step. Continue that run with "
                    "train.resume_from=latest, start over with train.overwrite=true (deletes those files), or "
                    "choose another output_dir."
                )
        except (ConfigError, ckpt.CheckpointError) as err:
            problem = err
        if self._any_rank(problem is not None):
            raise problem or ConfigError("another process refused to start this run; its log says why")
        return resume

    def _check_resumable(self, path: Path) -> None:
        changes = resume_changes(self.cfg, path)
        if changes:
            may = ", ".join(c + "*" if c.endswith(".") else c for c in CHANGEABLE_ON_RESUME)
            raise ConfigError(
                f"train.resume_from={self.cfg.train.resume_from}: these settings differ from the ones checkpoint "
                f"{path} was trained with: {'; '.join(changes)}. Resuming continues that run's weights, optimizer "
                "state, lr schedule and data order, which these settings shaped: set them back, or start a new run "
                "with them (another output_dir, or train.overwrite=true). Settings that may change on resume: "
                f"{may}, and train.max_steps under train.lr_schedule=constant."
            )

    @staticmethod
    def _drop_frozen_weights(models, weights, output_dir) -> None:
        """accelerate's save_state hook: keep only the trained entries of the model's state."""
        for model, state in zip(models, weights):
            for key in set(state) - ckpt.trained_keys(model):
                del state[key]

    def _resume(self, path: Path, state: dict) -> None:
        trained_only = (path / ckpt.BASE_FILE).is_file()
        if trained_only:  # the frozen weights are this run's rebuilt base: check they are the recorded ones
            ckpt.check_base(self.unwrapped_model(), json.loads((path / ckpt.BASE_FILE).read_text()), path)
        try:
            # strict=False: the state holds the trained entries only (and is checked to hold all of them)
            self.accelerator.load_state(str(path / "state"), strict=not trained_only)
            if trained_only:
                self._check_trained_state(path / "state")
        except ckpt.CheckpointError:
            raise
        except Exception as err:  # a checkpoint of another model or topology (validate caught damaged bytes)
            raise ckpt.CheckpointError(
                f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); it is corrupt or was written "
                "by a different model or topology. Resume from an earlier one with train.resume_from=<dir>."
            ) from err
        self.start_step = state["step"]
        log.info("resumed from %s at step %d", path, self.start_step)

    def _check_trained_state(self, state_dir: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(state_dir / "model.safetensors"), "pt") as saved:
            missing = sorted(ckpt.trained_keys(self.model) - set(saved.keys()))
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {state_dir.parent} lacks trained weights this run has "
                                       f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); it was "
                                       "written by a run of other settings. Start a new run, or resume the run it "
                                       "belongs to.")

    # ----- Loop ---------------------------------------------------------------------------

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._reduce_sum(torch.tensor(float(flag))).item() > 0)

    def _reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(self.accelerator.device, torch.float64)
        return self.accelerator.reduce(value, reduction="sum") if self.accelerator.num_processes > 1 else value

    def train_step(self, step: int) -> dict[str, float]:
        acc, model = self.accelerator, self.model
        cfg, sampler = self.cfg, self.sampler
        batches = [self.collate([{**self.samples[sampler.index(pos)], NOISE_SEED: noise_seed(cfg.seed, pos)}
                                 for pos in micro]) for micro in sampler.positions(step)]
        # Every micro-batch carries the step, for losses that follow a curriculum (block size).
        batches = [{**{k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in b.items()}, "step": step}
                   for b in batches]
        total_targets = self._reduce_sum(sum(b["n_targets"] for b in batches))
        if total_targets.item() == 0:
            raise ValueError(f"step {step} has no supervised target in any micro-batch; check the data's labels")
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        extra: dict[str, float] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with acc.no_sync(model) if not last else contextlib.nullcontext():
                batch_loss, metrics = model(batch)
                # DDP averages gradients over processes, so scale by their count to get the
                # gradient of (global loss sum / global target count). DeepSpeed also divides
                # by its accumulation steps, which this normalisation already accounts for.
                scale = acc.num_processes * (self.cfg.train.grad_accum if self._deepspeed else 1)
                acc.backward(batch_loss * scale / total_targets.float())
            loss_sum += batch_loss.detach().double()
            for k, v in metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / len(batches)
        grad_norm = None
        if self.cfg.train.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(model.parameters(), self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = (self._reduce_sum(loss_sum) / total_targets).item()
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {step + 1}")  # fit() says what to do about it
        # Real tokens trained on: collators without a padded attention mask report `n_tokens`.
        tokens = self._reduce_sum(sum(b["n_tokens"] if "n_tokens" in b else b["attention_mask"].sum()
                                      for b in batches)).item()
        out = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens": tokens, **extra}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def fit(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        with PreemptionFlag() as preemption:
            if self.model is None:
                try:
                    self.setup()
                except SetupInterrupted:
                    log.warning("SIGTERM during setup: nothing trained yet, no checkpoint written; rerun the same "
                                "command to start again (rollouts resume from their last finished batch)")
                    raise
            preemption.training = True
            result = TrainResult(self.output_dir, self.start_step)
            bar = tqdm(total=cfg.train.max_steps, initial=self.start_step, desc=cfg.recipe,
                       disable=not (acc.is_main_process and cfg.logging.progress_bar))
            window_tokens, window_start = 0.0, time.perf_counter()
            for step in range(self.start_step, cfg.train.max_steps):
                if self._any_rank(preemption.raised):
                    result.preempted = True
                    break
                step_start = time.perf_counter()
                try:
                    stats = self.train_step(step)
                except TrainingDiverged:
                    raise self._diverged(step, f"the loss is not finite at step {step + 1}") from None
                # seconds of this step and the wall clock at its end, to time a run and place it in logs
                stats.update(step_s=time.perf_counter() - step_start, time=time.time())
                done = step + 1
                result.losses.append(stats["loss"])
                result.steps = done
                window_tokens += stats["tokens"]
                if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    stats["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                    if torch.cuda.is_available():
                        stats["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                    window_tokens, window_start = 0.0, time.perf_counter()
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{stats['tokens_per_s']:.0f}")
                self.metrics.log(done, stats)
                bar.update(1)
                if cfg.train.save_every and done % cfg.train.save_every == 0 and done < cfg.train.max_steps:
                    self.save_checkpoint(done)
                if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.max_steps:
                    self.evaluate(done)
        bar.close()
        if result.preempted:
            self.save_checkpoint(result.steps)
            log.warning("preempted after step %d: checkpoint saved; rerun with train.resume_from=latest to continue",
                        result.steps)
            self.metrics.close()
            return result
        if self.start_step < cfg.train.max_steps or not ckpt.list_checkpoints(self.output_dir):
            self.save_checkpoint(cfg.train.max_steps)
        if cfg.eval.at_end:
            result.eval_rows = self.evaluate(cfg.train.max_steps)
        if cfg.export.dir and acc.is_main_process:
            export_model(self.unwrapped_model(), self.tokenizer, cfg, cfg.export.dir, result.eval_rows,
                         export_settings=self.recipe.export_settings, samples=len(self.samples), trained=self.trained)
            if cfg.export.push_to:
                push(cfg.export.dir, cfg.export.push_to)
        acc.wait_for_everyone()
        self.metrics.close()
        return result

    # ----- Checkpoints, eval --------------------------------------------------------------

    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model).model

    def save_checkpoint(self, step: int) -> Path:
        acc = self.accelerator
        # A checkpoint of non-finite weights could only resume into NaN. Every rank checks its own
        # (under ZeRO, sharded) state and they agree, so none writes while another stops.
        if self._any_rank(not self._finite()):
            raise self._diverged(step, f"the trained weights or optimizer state are not finite after step {step}, "
                                       "so no checkpoint of it was written")
        fingerprints = self.check_processes_agree(step)
        tmp = ckpt.temporary_dir(self.output_dir, step)
        if acc.is_main_process:  # a crash may have left a partial write of this step behind
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))
        if acc.is_main_process:
            model = self.unwrapped_model()
            if self._trained_only and self.cfg.model.lora.r == 0:
                from safetensors.torch import save_file

                keep = ckpt.trained_keys(model)
                (tmp / "model").mkdir()
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep},
                          tmp / "model" / ckpt.TRAINED_FILE)
            else:  # whole weights, or under LoRA the adapter alone
                model.save_pretrained(tmp / "model", safe_serialization=True)
                save_addons(model, tmp / "model")  # heads, noisy weights: what save_pretrained leaves out
            if self._trained_only:
                if self._base is None:  # the frozen weights never change: hashed once
                    name = self.cfg.model.name_or_path
                    self._base = ckpt.base_record(model, name, model_fingerprint(name))
                (tmp / ckpt.BASE_FILE).write_text(json.dumps(self._base, indent=2))
            self.tokenizer.save_pretrained(tmp / "model")
            self.cfg.save(tmp / "config.yaml")
            final = ckpt.finalize(self.output_dir, step, {"step": step, "samples_seen": step * self._per_step(),
                                                          "samples": len(self.samples), "trained": self.trained,
                                                          "process_fingerprints": fingerprints},
                                  self.cfg.train.keep_last)
        acc.wait_for_everyone()
        return ckpt.checkpoint_root(self.output_dir) / ckpt.step_dir_name(step) if not acc.is_main_process else final

    def _finite(self) -> bool:
        trained = [p.detach() for p in self.model.parameters() if p.requires_grad]
        moments = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return all(bool(torch.isfinite(t).all()) for t in trained + moments)

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        """The error for a run that diverged in the step after ``step`` optimizer steps, pointing at the
        newest checkpoint older than that step: the checkpoint of ``step`` itself holds the weights
        that diverged."""
        good = [p for p in ckpt.list_checkpoints(self.output_dir) if int(ckpt.STEP_DIR.match(p.name)[1]) < step]
        where = (f"The last checkpoint written before the divergence is {good[-1]} (its weights are in "
                 f"{good[-1] / 'model'}); any later one holds diverging weights." if good else
                 "No checkpoint was written before the divergence.")
        return TrainingDiverged(
            f"{what}; training stopped. Resuming repeats the same steps on the same data and diverges again: "
            "start a new run (another output_dir, or train.overwrite=true) with a lower train.lr, "
            f"train.max_grad_norm > 0, or checked data. {where}"
        )

    def check_processes_agree(self, step: int) -> list[list[float]]:
        """Every process's fingerprint of the trained weights; raise unless they are identical.

        Where each process holds the whole model (DDP, ZeRO-1/2), one run has one set of weights:
        processes that disagree have trained different models, and a checkpoint of rank 0's
        would silently drop the others' updates. Sharded setups (FSDP, ZeRO-3) hold different
        shards by design and are not compared.
        """
        acc = self.accelerator
        trained = [p.detach() for p in self.model.parameters() if p.requires_grad]
        # [2]: two float64 sums, equal for bit-identical weights and unequal for any realistic drift
        local = torch.stack([sum(p.double().sum() for p in trained), sum(p.double().square().sum() for p in trained)])
        everyone = acc.gather(local.to(acc.device)[None]).cpu()  # [processes, 2]
        sharded = acc.distributed_type == DistributedType.FSDP or (
            self._deepspeed and acc.state.deepspeed_plugin.zero_stage == 3)
        if not sharded and not bool((everyone == everyone[0]).all()):
            raise ProcessesDiverged(
                f"at step {step} the {acc.num_processes} processes hold different trained weights "
                f"(fingerprints {everyone.tolist()}): their gradients were not synchronised. No checkpoint was "
                "written; a recipe whose trained parameters run outside the prepared module causes this."
            )
        return everyone.tolist()

    def _per_step(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.accelerator.num_processes

    def evaluate(self, step: int) -> list[dict]:
        """Evaluate on the main process through the inference engine; log accuracy per task."""
        rows: list[dict] = []
        if self.accelerator.is_main_process:
            from leaplm.inference.evaluate import evaluate_model

            e = self.cfg.eval
            rows = evaluate_model(self.unwrapped_model(), self.tokenizer, tasks=e.tasks, n=e.n, decoder=e.decoder,
                                  decoder_settings=e.decoder_settings, max_new_tokens=e.max_new_tokens,
                                  batch_size=e.batch_size, seed=self.cfg.data.seed, model_name=self.cfg.output_dir)
            self.metrics.log(step, {f"eval/{r['task']}/accuracy": r["accuracy"] for r in rows})
            (self.output_dir / f"eval-step-{step:06d}.json").write_text(json.dumps(rows, indent=2))
        self.accelerator.wait_for_everyone()
        return rows


def end_processes() -> None:
    """Close this process's distributed group (a no-op in one process); call once, after the last run."""
    PartialState().destroy_process_group()


def train(cfg: Config) -> TrainResult:
    """Run ``cfg``; the result of its last stage when the recipe splits it into stages (``Recipe.stages``).

    Stages run in order, each a full Trainer run in its own output_dir. Each finished stage leaves
    ``stage_done.json`` (its config but ``resume_from`` and ``overwrite``); under ``train.resume_from=latest``
    a stage whose marker holds the same config is skipped, and the first unfinished one resumes from its own
    checkpoints. Without resume_from, each stage refuses (or with ``train.overwrite``, clears) the earlier
    run in its output_dir, like a single run.
    """
    recipe = get_recipe(cfg.recipe)
    stages = recipe.stages(cfg) if recipe.stages is not None else [cfg]
    if len(stages) == 1:
        return Trainer(stages[0]).fit()
    def settings(stage: Config) -> dict:  # the stage's config as its marker reads back, however it was started
        tree = json.loads(json.dumps(stage.to_dict()))
        tree["train"].pop("resume_from")
        tree["train"].pop("overwrite")
        return tree

    result = None
    for k, stage in enumerate(stages, 1):
        marker = Path(stage.output_dir) / "stage_done.json"
        if stage.train.resume_from == "latest" and marker.is_file() and json.loads(marker.read_text()) == settings(stage):
            log.info("stage %d/%d already finished in %s: skipped", k, len(stages), stage.output_dir)
            continue
        log.info("stage %d/%d in %s, from %s", k, len(stages), stage.output_dir, stage.model.name_or_path)
        trainer = Trainer(stage)
        result = trainer.fit()
        if result.preempted:  # the stage is unfinished: no marker, and later stages wait for the rerun
            return result
        if trainer.accelerator.is_main_process:
            marker.write_text(json.dumps(settings(stage), indent=2))
        trainer.accelerator.wait_for_everyone()
    return result or TrainResult(Path(stages[-1].output_dir), stages[-1].train.max_steps)
