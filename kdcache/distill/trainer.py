"""`DistillationTrainer`: a `transformers.Trainer` whose loss reads the teacher's targets from the
batch (cached, via the collator) or, for the online baseline, from a teacher run in the loop.

Everything else (mixed precision, accumulation, checkpointing, logging, DDP) is the Trainer's."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from accelerate.data_loader import SeedableRandomSampler
from safetensors.torch import load_file, save_file
from torch.utils.data import RandomSampler
from transformers import Trainer

from kdcache.cache import CacheError
from kdcache.cache.format import TargetSpec
from kdcache.config import ConfigError
from kdcache.data import EXAMPLE_ID, FEATURE_ID, LABELED, column_array
from kdcache.distill.collator import HIDDEN_KEY, HIDDEN_MASK_KEY, ReadAheadSampler, TargetFetcher, target_key
from kdcache.distill.losses import combined_loss, hidden_mse_loss, kd_kl_loss, sampled_kl, topk_renormalized_kl, topk_rest_kl
from kdcache.distill.shard_order import ShardBlockSampler
from kdcache.distill.transfer_mix import TransferMixSampler
from kdcache.distributed import any_rank, first_error
from kdcache.teacher import pool_student, select_hidden

__all__ = ["PROJECTIONS_FILE", "TrainingDiverged", "OnlineTeacher", "DistillationTrainer"]

PROJECTIONS_FILE = "kd_projections.safetensors"


class TrainingDiverged(ConfigError):
    """The loss or the gradient became NaN or inf while the batch's inputs and teacher targets were finite:
    the run's settings (learning rate, loss weights, precision) made training blow up."""


def _rows(batches: list[torch.Tensor], limit: int = 8) -> str:
    """Training rows (0-based, in the data's order) of ``batches`` (their example-id tensors) for a message: the
    first ``limit`` of them. Converted only here, when a message needs them: nothing per step."""
    ids = sorted({int(i) for rows in batches for i in rows.tolist()})
    return ", ".join(map(str, ids[:limit])) + (f" ... ({len(ids)} rows)" if len(ids) > limit else "")


def _find_sampler(batch_sampler, cls: type):
    """The sampler of type ``cls`` at the bottom of a DataLoader's batch-sampler chain (accelerate wraps torch's), or None."""
    while batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", None)
        if isinstance(sampler, cls):
            return sampler
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    return None


def _finite(value) -> bool:
    """A scalar (tensor or number) is neither NaN nor inf."""
    return bool(torch.isfinite(torch.as_tensor(value, dtype=torch.float32)))


class OnlineTeacher:
    """The teacher in the loop (the baseline kdcache replaces): same targets as the cache, computed each step."""

    def __init__(self, model: torch.nn.Module, task, layers: Optional[tuple[int, ...]], pooling: str, need_logits: bool = True):
        self.model = model.eval()
        self.task = task
        self.layers = layers
        self.pooling = pooling
        self.need_logits = need_logits
        for p in self.model.parameters():
            p.requires_grad_(False)

    def place(self, device: torch.device) -> None:
        """Move the teacher to the batch's device (the student's: the Trainer placed both there) once, on
        the first batch that arrives elsewhere; a teacher already there is left as it is."""
        first = next(self.model.parameters(), None)
        if first is not None and first.device != device:
            self.model.to(device)

    @torch.no_grad()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.place(next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device)
        out = self.model(**self.task.model_inputs(inputs, with_labels=False), output_hidden_states=self.layers is not None)
        targets = {target_key(k): v.float() for k, v in self.task.output_targets(out).items()} if self.need_logits else {}
        if self.layers is not None:
            mask = inputs["attention_mask"]
            targets[HIDDEN_KEY] = select_hidden(self.task.hidden_states(out), self.layers, mask, self.pooling).float()
            if self.pooling == "none":
                targets[HIDDEN_MASK_KEY] = mask.bool()
        return targets


class DistillationTrainer(Trainer):
    """Trainer with the kdcache loss: alpha·T²·KL + (1−alpha)·CE + hidden_weight·Σ MSE.

    KL and MSE average over every row of the batch; CE over the rows with a hard label only (transfer-set rows carry
    -100), and a batch of transfer rows only has no CE term."""

    def __init__(self, *args: Any, task, temperature: float, alpha: float, hidden_weight: float, distill_logits: bool,
                 hidden_pooling: str = "none", fetcher: Optional[TargetFetcher] = None,
                 online_teacher: Optional[OnlineTeacher] = None, targets: Optional[dict[str, TargetSpec]] = None,
                 topk_loss: str = "rest", cross_tokenizer=None,
                 transfer_proportion: Optional[float] = None, **kwargs: Any):
        """``targets``: the stored spec of each distilled target field (its mode decides the loss; absent =
        full logits, as the online teacher gives); ``topk_loss``: "rest" (k+1 buckets) or "renormalized";
        ``cross_tokenizer`` (a :class:`kdcache.cross_tokenizer.CrossTokenizer`): the cache's top-k ids are the teacher
        tokenizer's, mapped into the student's vocabulary at the aligned positions; ``transfer_proportion``: the fraction
        of every batch drawn from the transfer set (:class:`TransferMixSampler`; None: one shuffled pool)."""
        super().__init__(*args, **kwargs)
        self.transfer_proportion = transfer_proportion
        self.cross_tokenizer = cross_tokenizer
        self.task = task
        self.targets = dict(targets or {})
        self.topk_loss = topk_loss
        self.temperature = temperature
        self.alpha = alpha
        self.hidden_weight = hidden_weight
        self.distill_logits = distill_logits
        self.hidden_pooling = hidden_pooling
        self.fetcher = fetcher
        self.online_teacher = online_teacher
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        # Running sums stay on the device until a log step: no host sync per training step.
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._counts: dict[str, int] = {}  # batches that had each loss term since the last log
        self._agreements = 0  # steps that measured teacher agreement (vocabulary-scale heads: the logged steps only)
        self._last_predictions: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (teacher, student) argmax [N]
        self.save_projections = True  # checkpoints keep them for resuming; the final save drops them
        self._step_rows: list[torch.Tensor] = []  # example ids [B] of each micro-batch of the optimizer step in progress
        self._rows_step = -1  # the global step they belong to

    # -- data -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        base = super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.transfer_proportion is not None and base is not None:  # every batch: a fixed share of transfer rows
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            base = TransferMixSampler(column_array(dataset, LABELED), self._train_batch_size, self.transfer_proportion, seed)
        if self.fetcher is None or base is None:
            return base
        if type(base) is RandomSampler and self.accelerator.dataloader_config.use_seedable_sampler:
            # What accelerate's prepare does to a plain RandomSampler (it cannot see one wrapped): the order then
            # depends on the seed and the epoch only, so every rank draws the same one and deals it out.
            base = SeedableRandomSampler(data_source=base.data_source, replacement=base.replacement,
                                         num_samples=base._num_samples, data_seed=self.args.data_seed)
        feature_ids = column_array(dataset, FEATURE_ID)  # [N]
        base = ShardBlockSampler(base, self.fetcher.reader, feature_ids)  # a staged cache: shard by shard
        return ReadAheadSampler(
            base, self._train_batch_size, feature_ids, column_array(dataset, "length"), self.fetcher,
        )

    def get_train_dataloader(self):
        """The Trainer's (accelerate-prepared) loader; the read-ahead learns from its batch sampler which batches
        this process takes."""
        loader = super().get_train_dataloader()
        sampler = _find_sampler(loader.batch_sampler, ReadAheadSampler)
        if sampler is not None:
            sampler.bind(loader.batch_sampler)
        return loader

    # -- stopping on a non-finite loss or gradient ---------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, stopped at the first NaN/inf loss (the Trainer would log it as the running mean
        and train on). One host sync per step, as the Trainer's own NaN filter already has."""
        if self._rows_step != self.state.global_step:  # a new optimizer step (several micro-batches with accumulation)
            self._rows_step, self._step_rows = self.state.global_step, []
        rows = inputs.get(EXAMPLE_ID)
        if rows is not None:
            self._step_rows.append(rows)  # a reference: read (one copy) only if a message needs it
        loss = super().training_step(model, inputs, num_items_in_batch)
        world = self.args.world_size
        if any_rank(~torch.isfinite(loss.detach()), world):  # under DDP a collective decision: every rank stops here
            error = self._non_finite("the loss", float(loss), inputs) if not _finite(loss) else None
            raise first_error(error, world)  # the lowest failing rank's error, on every rank
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm (all ranks' gradients: the same value on every rank), checked before the
        optimizer step can write NaN into the weights. fp16 with loss scaling is exempt: its scaler skips
        overflowing steps by design."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and self.accelerator.scaler is None and not _finite(grad_norm):
            raise self._non_finite("the gradient norm", float(grad_norm), None, every_rank=True)
        return grad_norm

    def _non_finite(self, what: str, value: float, inputs, every_rank: bool = False) -> Exception:
        """The error for a non-finite loss or gradient: the cache's fault when the batch's teacher targets are
        themselves non-finite, else the run's settings. ``every_rank`` (collective): name the rows of every rank's
        batches, which the all-reduced gradient came from."""
        step = self.state.global_step + 1
        batches = self._step_rows
        if every_rank and self.args.world_size > 1:
            gathered: list = [None] * self.args.world_size
            torch.distributed.all_gather_object(gathered, [r.cpu() for r in batches])
            batches = [r for rank_rows in gathered for r in rank_rows]
        rows = _rows(batches)
        teacher = {k: v for k, v in (inputs or {}).items() if k.startswith("teacher_") and torch.is_tensor(v)
                   and v.is_floating_point()}
        damaged = [k[len("teacher_"):] for k, v in teacher.items() if not bool(torch.isfinite(v).all())]
        if damaged and self.fetcher is not None:
            path = self.fetcher.reader.path
            return CacheError(
                f"{what} is {value} at step {step} because the cached teacher targets ({', '.join(damaged)}) of training rows "
                f"{rows} hold NaN or inf: {path} is damaged (its checksums were forged, or a kdcache bug wrote them); redo it "
                "with `kdcache dump-teacher --force` and this config")
        checked = " (their teacher targets are finite)" if teacher else ""
        return TrainingDiverged(
            f"training diverged at step {step}: {what} is {value} on training rows {rows} (0-based rows of the training "
            f"data){checked}; lower learning_rate (--learning-rate, now "
            f"{self.args.learning_rate:g}) or hidden_loss_weight (--hidden-loss-weight), or turn use_mixed_precision off")

    # -- loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop(EXAMPLE_ID, None)
        inputs.pop(LABELED, None)  # transfer rows carry -100 labels (or the batch none): the CE covers the labeled rows
        teacher = {k: inputs.pop(k) for k in list(inputs) if k.startswith("teacher_")}
        if self.online_teacher is not None and model.training:
            teacher = self.online_teacher(inputs)
        want_hidden = HIDDEN_KEY in teacher
        outputs = model(**inputs, output_kd_hidden=want_hidden)  # hard labels in inputs: the model computes its CE
        ce = outputs["loss"]
        kd, agreement = None, None
        if self.distill_logits:
            kd, agreement = self._kd_loss(outputs["targets"], teacher, inputs)
        hidden = None
        if want_hidden:
            hidden = self._hidden_loss(outputs["kd_hidden"], teacher[HIDDEN_KEY], teacher.get(HIDDEN_MASK_KEY),
                                       inputs["attention_mask"])
        if ce is None and kd is None and hidden is None:
            raise ValueError("the batch has neither labels nor teacher targets: nothing to learn from")
        hard = ce
        if ce is None:
            ce = sum(v.sum() for v in outputs["targets"].values()) * 0.0
        loss = combined_loss(ce, kd, hidden, self.alpha if kd is not None else 0.0, self.hidden_weight)
        if model.training:
            self._track(hard, kd, hidden, agreement)
        return (loss, outputs) if return_outputs else loss

    def _kd_loss(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        """Mean over the stored target fields of T²·KL, each laid out as distributions by the task (full
        logits) or against the stored top-k / samples (vocabulary-scale heads); and the (teacher,
        student) argmax of every row that carries loss, for agreement."""
        losses, t_preds, s_preds = [], [], []
        for name, s_logits in student.items():
            spec = self.targets.get(name)
            if spec is not None and spec.sparse:
                if target_key(name, "idx") not in teacher:
                    continue
                s_view, mask = self.task.kd_view(name, s_logits, batch)  # [B, P, V], [B, P]
                comps = {suffix[1:]: teacher[target_key(name, suffix[1:])].to(s_logits.device)
                         for suffix in spec.components()}  # [B, P, m] each
                aligned = teacher.get(target_key(name, "aligned"))  # [B, P]: cross-tokenizer, the positions that align
                if aligned is not None:
                    mask = aligned.to(s_logits.device) if mask is None else mask & aligned.to(s_logits.device)
                # The argmax over a vocabulary costs a pass of its own: measured on the steps that are logged.
                logged = (self.state.global_step + 1) % max(int(self.args.logging_steps), 1) == 0
                loss, t_arg, s_arg = self._sparse_kd(spec, s_view, comps, mask, agreement=logged)
                if t_arg is None:
                    losses.append(loss)
                    continue
            else:
                key = target_key(name)
                if key not in teacher:
                    continue
                s_view, mask = self.task.kd_view(name, s_logits, batch)  # [B, P, K], [B, P] or None
                t_view, _ = self.task.kd_view(name, teacher[key].to(s_logits.device), batch)
                s_view = s_view[..., : t_view.shape[-1]]  # a padded embedding matrix's extra rows: no token reaches them
                loss = kd_kl_loss(s_view, t_view, self.temperature, mask)
                with torch.no_grad():
                    t_arg, s_arg = t_view.argmax(-1), s_view.argmax(-1)  # [B, P]
                    if mask is not None:
                        t_arg, s_arg = t_arg[mask], s_arg[mask]
            losses.append(loss)
            t_preds.append(t_arg.reshape(-1))
            s_preds.append(s_arg.reshape(-1))
        if not losses:
            return None, None
        return torch.stack(losses).mean(), (torch.cat(t_preds), torch.cat(s_preds)) if t_preds else None

    def _sparse_kd(self, spec: TargetSpec, s_view: torch.Tensor, comps: dict[str, torch.Tensor], mask: Optional[torch.Tensor],
                   agreement: bool = True):
        """The loss of one topk / sampled field over the rows that carry loss, and (teacher, student) argmax.

        The loss runs on the padded [B, P, V] logits with the mask (no gathered copy of the rows: on a
        vocabulary-scale head that copy and its backward cost more than the loss)."""
        # [B, P, V]: a padded embedding matrix's extra rows dropped (a view); the vocabulary is the student's own when
        # the cache holds another tokenizer's (cross-tokenizer), the teacher's (the same) otherwise
        width = self.cross_tokenizer.student_vocab if self.cross_tokenizer is not None else spec.width
        s = s_view[..., :width]
        T = self.temperature
        if self.cross_tokenizer is not None:  # another tokenizer's top-k: mapped into the student's vocabulary at T
            loss, comps = self.cross_tokenizer.topk_kl(s, comps, spec, T, mask)
        elif spec.mode == "topk" and self.topk_loss == "renormalized":  # needs no stored normaliser
            loss = topk_renormalized_kl(s, comps["idx"], comps["logp"], T, mask)
        elif spec.mode == "topk":
            loss = topk_rest_kl(s, comps["idx"], comps["logp"], comps["logrest"][..., spec.temperature_index(T)], T, mask)
        else:
            loss = sampled_kl(s, comps["idx"], comps["count"], comps["logp"], comps["lse"][..., spec.temperature_index(T)], T,
                              spec.k, mask)
        if not agreement:
            return loss, None, None
        with torch.no_grad():
            if spec.mode == "topk":
                t_arg = comps["idx"][..., 0]  # [B, P]: stored in descending order (mapped: an unmapped top-1 never agrees)
            else:
                best = comps["logp"].masked_fill(comps["count"] == 0, float("-inf")).argmax(-1, keepdim=True)
                t_arg = comps["idx"].gather(-1, best)[..., 0]  # [B, P]
            s_arg = s.argmax(-1)  # [B, P]
            if mask is not None:
                t_arg, s_arg = t_arg[mask], s_arg[mask]
        return loss, t_arg, s_arg

    def _hidden_loss(self, student_h: torch.Tensor, teacher_h: torch.Tensor, teacher_mask, attention_mask) -> torch.Tensor:
        """Σ over stored layers of the MSE; student_h [B, L, S, H], teacher_h [B, L, S|1, H]."""
        total = student_h.new_zeros((), dtype=torch.float32)
        for l in range(student_h.shape[1]):
            s = student_h[:, l]  # [B, S, H]
            if self.hidden_pooling == "none":
                total = total + hidden_mse_loss(s, teacher_h[:, l], teacher_mask)
            else:
                total = total + hidden_mse_loss(pool_student(s, attention_mask, self.hidden_pooling), teacher_h[:, l])
        return total

    @torch.no_grad()
    def _track(self, ce, kd, hidden, agreement) -> None:
        for key, value in (("loss_ce", ce), ("loss_kd", kd), ("loss_hidden", hidden)):
            if value is not None:
                self._sums[key] = self._sums.get(key, 0.0) + value.detach().float()
                self._counts[key] = self._counts.get(key, 0) + 1  # a batch of transfer rows only has no CE term
        if agreement is not None and agreement[0].numel():
            t_pred, s_pred = agreement
            self._sums["teacher_agreement"] = self._sums.get("teacher_agreement", 0.0) + (t_pred == s_pred).float().mean()
            self._agreements += 1
            self._last_predictions = (t_pred, s_pred)
        self._count += 1

    @property
    def last_predictions(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Teacher and student argmax (classes, tags or positions) on the last training batch (for the monitor)."""
        if self._last_predictions is None:
            return None
        return tuple(p.cpu().numpy() for p in self._last_predictions)  # type: ignore[return-value]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the mean loss components since the last log to the Trainer's training logs."""
        if "loss" in logs and self._count:
            for key, value in self._sums.items():
                logs[key] = round(float(value) / (self._agreements if key == "teacher_agreement" else self._counts[key]), 6)
            self._sums.clear()
            self._counts.clear()
            self._count = 0
            self._agreements = 0
        super().log(logs, *args, **kwargs)

    # -- saving: only the student is a model; projections ride along in checkpoints ----------
    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.student.save_pretrained(output_dir)
        if len(model.projections) and self.save_projections:
            save_file({k: v.contiguous() for k, v in model.projections.state_dict().items()},
                      os.path.join(output_dir, PROJECTIONS_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        student_cls = type(model.student)
        loaded = student_cls.from_pretrained(resume_from_checkpoint)
        model.student.load_state_dict(loaded.state_dict())
        proj_path = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if os.path.exists(proj_path):
            model.projections.load_state_dict(load_file(proj_path))
