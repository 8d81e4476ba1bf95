"""Exit losses (CE, dynamic token weighting, KD) fused with the vocabulary head, chunked over tokens.

Total loss, for exits i with weights w_i over tokens t with valid targets:

    loss = sum_i w_i * sum_t a_it * l_it / normalizer
    l_it = (1 - kd_alpha) * CE_it + kd_alpha * T^2 * KL(softmax(z_final_t / T) || softmax(z_it / T))
    a_it = 1                               (token_weighting="none")
         = max softmax prob of exit i at t, detached   (token_weighting="dynamic")

`exit_losses` never builds the [tokens, vocab] logits: a `torch.autograd.Function` walks chunks of
tokens, computes each chunk's logits (in the input dtype), softmax/loss (in fp32) and the gradients
w.r.t. the hidden states (and w.r.t. a head weight only when it requires grad: a shared frozen head
costs no [V, D] weight-gradient matmul), keeps the gradients and only scales them in backward (the
approach of Liger's fused linear cross-entropy). The teacher's chunk of logits is computed once and
shared by every exit. `exit_losses_reference` is the plain full-logits autograd version, for tests.

Vocabulary parallel (tensor parallel heads, "loss parallel"): with a `VocabShard`, every head weight
holds only this rank's rows of the vocabulary; per-token reductions over the vocabulary (max, sum,
the target's logit, argmax, dot products with the teacher) are completed with all-reduces over the
shard's group, and the gradient w.r.t. the (replicated) hiddens is summed over it. Loss, gradients
and statistics then equal the unsplit computation on every rank; weight gradients stay sharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from eetune.data.corpus import IGNORE_INDEX
from eetune.errors import EetuneError

TOKEN_WEIGHTINGS = ("none", "dynamic")
DEFAULT_CHUNK_SIZE = 1024

# Columns of the per-exit stats tensor the fused function returns (sums over this call's tokens).
_WEIGHTED, _CE, _KD, _MAX_PROB, _AGREE = range(5)


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + size) of a `vocab`-row head split across `group`."""

    group: Any  # torch.distributed ProcessGroup
    start: int
    size: int
    vocab: int


class _LocalVocab:
    """Reductions over the vocabulary when each rank holds all of it: plain tensor ops."""

    def max(self, row_max: torch.Tensor) -> torch.Tensor:
        return row_max

    def sum(self, *row_sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return row_sums

    def argmax(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=-1)

    def target_logit(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return z.gather(1, targets[:, None]).squeeze(1)

    def sub_at_targets_(self, grad: torch.Tensor, targets: torch.Tensor, values: torch.Tensor) -> None:
        grad.scatter_add_(1, targets[:, None], -values[:, None])

    def sum_hidden_grad_(self, grad: torch.Tensor) -> None:
        pass


class _ShardedVocab(_LocalVocab):
    """The same reductions when the vocabulary is split across a process group (see module doc)."""

    def __init__(self, shard: VocabShard) -> None:
        self.shard = shard

    def max(self, row_max: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.shard.group)
        return row_max

    def sum(self, *row_sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stacked = torch.stack(row_sums)  # one all-reduce for all of them
        dist.all_reduce(stacked, group=self.shard.group)
        return tuple(stacked.unbind(0))

    def argmax(self, z: torch.Tensor) -> torch.Tensor:
        # Local (max, index) pairs from every rank; the first rank holding the global max wins,
        # which is torch.argmax's first-occurrence rule over the whole vocabulary.
        local_max, local_idx = z.max(dim=-1)
        size = dist.get_world_size(self.shard.group)
        maxes = [torch.empty_like(local_max) for _ in range(size)]
        indices = [torch.empty_like(local_idx) for _ in range(size)]
        dist.all_gather(maxes, local_max, group=self.shard.group)
        dist.all_gather(indices, local_idx + self.shard.start, group=self.shard.group)
        best = torch.stack(maxes).argmax(dim=0)
        return torch.stack(indices).gather(0, best[None]).squeeze(0)

    def _local(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = targets - self.shard.start
        owned = (local >= 0) & (local < self.shard.size)
        return torch.where(owned, local, 0), owned

    def target_logit(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        local, owned = self._local(targets)
        return torch.where(owned, z.gather(1, local[:, None]).squeeze(1), 0.0)  # summed by the caller

    def sub_at_targets_(self, grad: torch.Tensor, targets: torch.Tensor, values: torch.Tensor) -> None:
        local, owned = self._local(targets)
        grad.scatter_add_(1, local[:, None], -(values * owned)[:, None])

    def sum_hidden_grad_(self, grad: torch.Tensor) -> None:
        # Each rank's rows of the head contribute a part of dloss/dhidden.
        dist.all_reduce(grad, group=self.shard.group)


@dataclass(frozen=True)
class ExitStats:
    """Detached per-exit statistics, means over this call's valid tokens (0-dim fp32 tensors)."""

    ce: torch.Tensor
    """Cross-entropy against the targets."""
    weighted_loss: torch.Tensor
    """This exit's share of `ExitLossOutput.loss`: w_i * sum_t a_it * l_it / normalizer."""
    max_prob: torch.Tensor
    """Max softmax probability (the confidence early-exit inference thresholds)."""
    kd: Optional[torch.Tensor]
    """T^2 * KL(teacher || exit) at temperature T, as it enters the loss; None without a teacher."""
    agreement: Optional[torch.Tensor]
    """Fraction of tokens whose exit argmax equals the teacher's; None without a teacher."""


@dataclass(frozen=True)
class ExitLossOutput:
    """What `exit_losses` returns."""

    loss: torch.Tensor
    """Scalar fp32 loss, differentiable w.r.t. the hiddens and trainable head weights."""
    exits: dict[int, ExitStats]
    """Per-exit statistics, by exit layer."""
    num_valid: int
    """Number of targets here that are not `IGNORE_INDEX`."""
    exit_top1: Optional[dict[int, torch.Tensor]] = None
    """Per exit, the argmax token at every position with a target, `IGNORE_INDEX` elsewhere
    (targets' shape); only with `return_top1`."""
    teacher_top1: Optional[torch.Tensor] = None
    """The teacher's argmax token likewise; only with `return_top1` and a teacher."""


def vocab_argmax(logits: torch.Tensor, vocab_shard: Optional[VocabShard] = None) -> torch.Tensor:
    """Row-wise argmax of [N, V] logits; with a `vocab_shard`, of every rank's columns together."""
    if vocab_shard is None:
        return logits.argmax(dim=-1)
    return _ShardedVocab(vocab_shard).argmax(logits)


@dataclass(frozen=True)
class _Args:
    """Validated, flattened arguments shared by the fused and the reference implementation."""

    layers: tuple[int, ...]
    hiddens: tuple[torch.Tensor, ...]  # [N, D] each
    heads: tuple[torch.Tensor, ...]  # [V, D] each, aligned with `layers`
    exit_weights: tuple[float, ...]
    targets: torch.Tensor  # [N]
    target_shape: torch.Size
    teacher_hidden: Optional[torch.Tensor]  # [N, D], detached
    teacher_head: Optional[torch.Tensor]  # [V, D], detached
    dynamic: bool
    kd_alpha: float
    temperature: float
    normalizer: float
    num_valid: int
    chunk_size: int
    vocab: _LocalVocab


def _check_args(
    hiddens: dict[int, torch.Tensor],
    head_weights: dict[int, torch.Tensor],
    targets: torch.Tensor,
    exit_weights: dict[int, float],
    token_weighting: str,
    teacher_hidden: Optional[torch.Tensor],
    teacher_head_weight: Optional[torch.Tensor],
    kd_alpha: float,
    kd_temperature: float,
    normalizer: Optional[float],
    chunk_size: int,
    vocab_shard: Optional[VocabShard] = None,
) -> _Args:
    """Option mistakes raise EetuneError; inconsistent tensors (a caller bug) raise ValueError."""
    if token_weighting not in TOKEN_WEIGHTINGS:
        raise EetuneError(f"token_weighting must be one of {TOKEN_WEIGHTINGS}, got {token_weighting!r}")
    if not (isinstance(kd_alpha, (int, float)) and 0.0 <= kd_alpha <= 1.0):
        raise EetuneError(f"kd_alpha must be a number in [0, 1] (0 = plain CE, 1 = pure KD), got {kd_alpha!r}")
    if not (isinstance(kd_temperature, (int, float)) and math.isfinite(kd_temperature) and kd_temperature > 0):
        raise EetuneError(f"kd_temperature must be a finite number > 0, got {kd_temperature!r}")
    if (teacher_hidden is None) != (teacher_head_weight is None):
        raise EetuneError("teacher_hidden and teacher_head_weight go together: pass both or neither")
    if kd_alpha > 0 and teacher_hidden is None:
        raise EetuneError(
            f"kd_alpha={kd_alpha} needs the final layer as teacher: pass teacher_hidden and "
            "teacher_head_weight, or set kd_alpha to 0"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise EetuneError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if normalizer is not None and not (math.isfinite(normalizer) and normalizer > 0):
        raise EetuneError(f"normalizer must be a finite number > 0 (the global valid-token count), got {normalizer!r}")
    if not hiddens:
        raise ValueError("exit_losses needs at least one exit")
    if set(hiddens) != set(head_weights) or set(hiddens) != set(exit_weights):
        raise ValueError(
            f"hiddens, head_weights and exit_weights must name the same exits, got {sorted(hiddens)}, "
            f"{sorted(head_weights)} and {sorted(exit_weights)}"
        )
    for layer, w in exit_weights.items():
        if not math.isfinite(w) or w < 0:
            raise EetuneError(f"exit weight for layer {layer} must be a finite number >= 0, got {w!r}")

    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    layers = tuple(sorted(hiddens))
    dim = hiddens[layers[0]].shape[-1]
    vocab = head_weights[layers[0]].shape[0]
    if vocab_shard is not None and vocab != vocab_shard.size:
        raise ValueError(f"head weights have {vocab} rows but this rank's vocabulary shard has {vocab_shard.size}")

    def flat_hidden(name: str, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if h.shape != (*targets.shape, dim):
            raise ValueError(f"{name} has shape {tuple(h.shape)}, expected targets' shape + (dim,) = "
                             f"{(*targets.shape, dim)}")
        if w.shape != (vocab, dim):
            raise ValueError(f"head weight for {name} has shape {tuple(w.shape)}, expected ({vocab}, {dim})")
        if h.dtype != w.dtype or h.device != w.device:
            raise ValueError(f"{name} ({h.dtype}, {h.device}) and its head weight ({w.dtype}, {w.device}) "
                             "must share dtype and device")
        return h.reshape(-1, dim)  # differentiable view; the caller's [B, S, D] is fine

    flat = tuple(flat_hidden(f"exit {layer}", hiddens[layer], head_weights[layer]) for layer in layers)
    t_hidden = t_head = None
    if teacher_hidden is not None and teacher_head_weight is not None:
        # The teacher is the frozen final layer: it gets no gradient.
        t_hidden = flat_hidden("teacher_hidden", teacher_hidden.detach(), teacher_head_weight.detach())
        t_head = teacher_head_weight.detach()

    flat_targets = targets.reshape(-1).long()
    valid = flat_targets != IGNORE_INDEX
    full_vocab = vocab if vocab_shard is None else vocab_shard.vocab
    if bool(((flat_targets < 0) | (flat_targets >= full_vocab))[valid].any()):
        raise ValueError(f"targets must be token ids in [0, {full_vocab}) or {IGNORE_INDEX} (ignored)")
    num_valid = int(valid.sum())
    return _Args(
        layers=layers,
        hiddens=flat,
        heads=tuple(head_weights[layer] for layer in layers),
        exit_weights=tuple(float(exit_weights[layer]) for layer in layers),
        targets=flat_targets,
        target_shape=targets.shape,
        teacher_hidden=t_hidden,
        teacher_head=t_head,
        dynamic=token_weighting == "dynamic",
        kd_alpha=float(kd_alpha),
        temperature=float(kd_temperature),
        # No valid token here and no global count: the loss is 0, not 0/0.
        normalizer=float(normalizer) if normalizer is not None else float(max(num_valid, 1)),
        num_valid=num_valid,
        chunk_size=chunk_size,
        vocab=_LocalVocab() if vocab_shard is None else _ShardedVocab(vocab_shard),
    )


def _build_output(args: _Args, loss: torch.Tensor, sums: torch.Tensor, exit_top1: Optional[torch.Tensor],
                  teacher_top1: Optional[torch.Tensor], return_top1: bool) -> ExitLossOutput:
    """`sums` is [exits, 5] (columns _WEIGHTED.._AGREE); turn the sums into means over valid tokens."""
    sums = sums.detach().double()
    count = max(args.num_valid, 1)
    has_teacher = args.teacher_hidden is not None
    exits = {
        layer: ExitStats(
            ce=(sums[i, _CE] / count).float(),
            weighted_loss=sums[i, _WEIGHTED].float(),
            max_prob=(sums[i, _MAX_PROB] / count).float(),
            kd=(sums[i, _KD] / count).float() if has_teacher else None,
            agreement=(sums[i, _AGREE] / count).float() if has_teacher else None,
        )
        for i, layer in enumerate(args.layers)
    }
    top1 = None
    if return_top1 and exit_top1 is not None:
        top1 = {layer: exit_top1[i].reshape(args.target_shape) for i, layer in enumerate(args.layers)}
    t_top1 = teacher_top1.reshape(args.target_shape) if return_top1 and teacher_top1 is not None else None
    return ExitLossOutput(loss=loss, exits=exits, num_valid=args.num_valid, exit_top1=top1, teacher_top1=t_top1)


# --- fused, chunked ------------------------------------------------------------------------------


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [C, V] tensors without a [C, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _Buffers:
    """[chunk, V] work tensors allocated once per call and reused by every chunk and exit.

    Fresh tensors this size (hundreds of MB on a real vocabulary) come straight from the OS, and
    page-faulting them in costs about as much as the softmax itself.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                 teacher: bool, temperature: float) -> None:
        fp32 = torch.float32
        self.logits = torch.empty(rows, vocab, dtype=fp32, device=device)
        # Matmul output / gradient cast in the input dtype, when that is not fp32.
        self.low = torch.empty(rows, vocab, dtype=dtype, device=device) if dtype != fp32 else None
        self.q = torch.empty(rows, vocab, dtype=fp32, device=device) if teacher else None
        # Teacher softmax scratch, then the exit's softmax at temperature T.
        self.scratch = torch.empty(rows, vocab, dtype=fp32, device=device) if teacher else None
        self.temperature = temperature

    def logits_of(self, hidden: torch.Tensor, head: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """fp32 `hidden @ head.T` into `out`, multiplied in the input dtype."""
        rows = hidden.shape[0]
        if self.low is None:
            return torch.mm(hidden, head.t(), out=out[:rows])
        return out[:rows].copy_(torch.mm(hidden, head.t(), out=self.low[:rows]))

    def to_input_dtype(self, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.low is None else self.low[: grad.shape[0]].copy_(grad)


@dataclass(frozen=True)
class _TeacherChunk:
    q: torch.Tensor  # [C, V] fp32 softmax(z_teacher / T)
    neg_entropy: torch.Tensor  # [C] sum_v q log q
    top1: torch.Tensor  # [C]


def _teacher_chunk(hidden: torch.Tensor, head: torch.Tensor, buffers: _Buffers, vocab: _LocalVocab) -> _TeacherChunk:
    assert buffers.q is not None and buffers.scratch is not None
    rows = hidden.shape[0]
    z = buffers.logits_of(hidden, head, buffers.q)
    z_max = vocab.max(z.amax(dim=-1))  # amax: max(dim) would also compute indices
    top1 = vocab.argmax(z)
    x = z.sub_(z_max[:, None]).div_(buffers.temperature)  # log q up to the row constant log(sum exp x)
    e = torch.exp(x, out=buffers.scratch[:rows])
    s, e_dot_x = vocab.sum(e.sum(dim=-1), _rowdot(e, x))
    neg_entropy = e_dot_x / s - s.log()  # sum q log q = sum q x - log s
    q = torch.div(e, s[:, None], out=x)  # x is no longer needed: q takes its place
    return _TeacherChunk(q=q, neg_entropy=neg_entropy, top1=top1)


def _exit_chunk(
    hidden: torch.Tensor,
    head: torch.Tensor,
    targets: torch.Tensor,
    teacher: Optional[_TeacherChunk],
    buffers: _Buffers,
    args: _Args,
    exit_weight: float,
    want_grad: bool,
    want_top1: bool,
) -> tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """One exit on one chunk: (dloss/dlogits [C, V] fp32 or None, stats [5], argmax [C] or None).

    Every row has a target (the caller leaves ignored positions out). The logits buffer is
    overwritten in place by the softmax and then the gradient, which stays valid until the next
    exit reuses the buffer. The argmax (a slow indexed pass) is computed only when returned or
    needed for teacher agreement.
    """
    alpha, temp, vocab = args.kd_alpha, args.temperature, args.vocab
    z = buffers.logits_of(hidden, head, buffers.logits)
    z_target = vocab.target_logit(z, targets)
    z_max = vocab.max(z.amax(dim=-1))
    top1 = vocab.argmax(z) if want_top1 or teacher is not None else None
    kd_dot = _rowdot(teacher.q, z) if teacher is not None else None
    p_temp: Optional[torch.Tensor] = None  # softmax(z / T), needed only when T != 1
    lse_temp: Optional[torch.Tensor] = None
    if teacher is not None and temp != 1.0:
        assert buffers.scratch is not None
        p_temp = torch.div(z, temp, out=buffers.scratch[: z.shape[0]]).sub_((z_max / temp)[:, None]).exp_()
        (s_temp,) = vocab.sum(p_temp.sum(dim=-1))
        p_temp.div_(s_temp[:, None])
        lse_temp = z_max / temp + s_temp.log()
    e = z.sub_(z_max[:, None]).exp_()  # unnormalised softmax, overwriting the logits
    if kd_dot is None:
        s, z_target = vocab.sum(e.sum(dim=-1), z_target)
    else:
        s, z_target, kd_dot = vocab.sum(e.sum(dim=-1), z_target, kd_dot)
    lse = z_max + s.log()
    ce = lse - z_target
    max_prob = s.reciprocal()  # exp(z_max - lse)

    stats = torch.zeros(5, dtype=torch.float64, device=z.device)
    loss = ce
    if teacher is not None and kd_dot is not None:
        # KL(q || p_T) = sum q log q - sum q z / T + logsumexp(z / T)
        kd = temp * temp * (teacher.neg_entropy - kd_dot / temp + (lse if lse_temp is None else lse_temp))
        loss = (1.0 - alpha) * ce + alpha * kd if alpha > 0 else ce
        stats[_KD] = kd.sum()
        assert top1 is not None  # always computed with a teacher
        stats[_AGREE] = (top1 == teacher.top1).sum()
    token_weight = max_prob if args.dynamic else torch.ones_like(max_prob)  # detached by construction
    stats[_WEIGHTED] = exit_weight * (token_weight * loss).sum() / args.normalizer
    stats[_CE] = ce.sum()
    stats[_MAX_PROB] = max_prob.sum()
    if not want_grad:
        return None, stats, top1

    # dl/dz = (1 - alpha) * (p - onehot) + alpha * T * (p_T - q), times the row's coefficient.
    coef = token_weight * (exit_weight / args.normalizer)
    if teacher is not None and alpha > 0 and p_temp is None:  # T == 1: p_T is p
        e.mul_((coef / s)[:, None]).addcmul_(teacher.q, (-alpha * coef)[:, None])
    else:
        e.mul_((coef * (1.0 - alpha) / s)[:, None])
        if teacher is not None and alpha > 0 and p_temp is not None:
            e.addcmul_(p_temp.sub_(teacher.q), (alpha * temp * coef)[:, None])
    if alpha < 1:
        vocab.sub_at_targets_(e, targets, (1.0 - alpha) * coef)
    return e, stats, top1


class _FusedExitLoss(torch.autograd.Function):
    """Forward computes the loss and all gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        args: _Args,
        head_slot: tuple[int, ...],
        want_top1: bool,
        grad_enabled: bool,
        *tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # tensors = the exits' hiddens, then the distinct head weights (a head shared by several
        # exits appears once, so its gradient is accumulated in one buffer).
        num_exits = len(args.layers)
        hiddens, heads = tensors[:num_exits], tensors[num_exits:]
        # needs_input_grad ignores no_grad/inference mode, where no gradient work is wanted at all.
        needs = [need and grad_enabled for need in ctx.needs_input_grad[4:]]
        need_h, need_w = needs[:num_exits], needs[num_exits:]
        n, dtype, device = args.targets.shape[0], hiddens[0].dtype, hiddens[0].device
        has_teacher = args.teacher_hidden is not None

        # Only positions with a target go through the heads (prompt tokens and padding are a
        # fifth of chat data); the others get a zero gradient and IGNORE_INDEX as their argmax.
        rows = (args.targets != IGNORE_INDEX).nonzero().view(-1)
        dense = rows.numel() == n

        def take(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
            return x[start:end] if dense else x.index_select(0, rows[start:end])

        zeros_or_empty = torch.empty_like if dense else torch.zeros_like
        grad_h = [zeros_or_empty(h) if need else None for h, need in zip(hiddens, need_h)]
        # Weight gradients accumulate over chunks: fp32 whatever the input dtype.
        grad_w = [torch.zeros(w.shape, dtype=torch.float32, device=device) if need else None
                  for w, need in zip(heads, need_w)]
        low_grad_w = (torch.empty(heads[0].shape, dtype=dtype, device=device)
                      if any(need_w) and dtype != torch.float32 else None)
        num_rows = rows.numel()
        buffers = _Buffers(max(min(args.chunk_size, num_rows), 1), heads[0].shape[0], dtype, device, has_teacher,
                           args.temperature)
        sums = torch.zeros(num_exits, 5, dtype=torch.float64, device=device)
        exit_top1 = torch.full((num_exits, n if want_top1 else 0), IGNORE_INDEX, dtype=torch.long, device=device)
        teacher_top1 = torch.full((n if want_top1 and has_teacher else 0,), IGNORE_INDEX, dtype=torch.long,
                                  device=device)

        for start in range(0, num_rows, args.chunk_size):
            end = min(start + args.chunk_size, num_rows)
            where = rows[start:end]
            y = take(args.targets, start, end)
            teacher = None
            if args.teacher_hidden is not None and args.teacher_head is not None:
                teacher = _teacher_chunk(take(args.teacher_hidden, start, end), args.teacher_head, buffers, args.vocab)
                if teacher_top1.numel():
                    teacher_top1[where] = teacher.top1
            for i in range(num_exits):
                slot = head_slot[i]
                h, w = take(hiddens[i], start, end), heads[slot]
                gh, gw = grad_h[i], grad_w[slot]
                grad_z, chunk_stats, top1 = _exit_chunk(
                    h, w, y, teacher, buffers, args, args.exit_weights[i],
                    want_grad=gh is not None or gw is not None, want_top1=want_top1,
                )
                sums[i] += chunk_stats
                if top1 is not None and exit_top1.numel():
                    exit_top1[i, where] = top1
                if grad_z is None:
                    continue
                g = buffers.to_input_dtype(grad_z)  # both matmuls run in the input dtype, like the forward
                if gh is not None:
                    if dense:
                        torch.mm(g, w, out=gh[start:end])
                    else:
                        gh.index_copy_(0, where, torch.mm(g, w))
                if gw is not None:
                    if low_grad_w is None:
                        gw.addmm_(g.t(), h)
                    else:
                        gw.add_(torch.mm(g.t(), h, out=low_grad_w))

        for gh in grad_h:
            if gh is not None:
                args.vocab.sum_hidden_grad_(gh)
        ctx.num_exits = num_exits
        ctx.head_dtypes = [w.dtype for w in heads]
        ctx.save_for_backward(*grad_h, *grad_w)
        loss = sums[:, _WEIGHTED].sum().float()
        ctx.mark_non_differentiable(sums, exit_top1, teacher_top1)
        return loss, sums, exit_top1, teacher_top1

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Optional[torch.Tensor], ...]:
        saved = ctx.saved_tensors
        grad_h, grad_w = saved[: ctx.num_exits], saved[ctx.num_exits:]
        unit = bool(torch.equal(grad_loss, torch.ones_like(grad_loss)))  # the usual case: no copy

        def scale(g: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
            if g is None:
                return None
            return (g if unit else g * grad_loss).to(dtype or g.dtype)

        return (
            None, None, None, None,
            *(scale(g) for g in grad_h),
            *(scale(g, dtype) for g, dtype in zip(grad_w, ctx.head_dtypes)),  # fp32 buffers -> head dtype
        )


def exit_losses(
    hiddens: dict[int, torch.Tensor],
    head_weights: dict[int, torch.Tensor],
    targets: torch.Tensor,
    exit_weights: dict[int, float],
    *,
    token_weighting: str = "none",
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head_weight: Optional[torch.Tensor] = None,
    kd_alpha: float = 0.0,
    kd_temperature: float = 1.0,
    normalizer: Optional[float] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
    vocab_shard: Optional[VocabShard] = None,
) -> ExitLossOutput:
    """Weighted sum of all exits' losses, fused with their heads and computed `chunk_size` tokens at a time.

    Args:
        hiddens: exit layer -> [..., D] normalised exit hidden state (what the head is applied to).
        head_weights: exit layer -> [V, D] head weight; a frozen (requires_grad False) one gets no
            gradient and costs no weight-gradient matmul. Several exits may share one tensor.
        targets: [...] next-token ids; `IGNORE_INDEX` (-100) positions contribute nothing.
        exit_weights: exit layer -> w_i (already warmed up by the caller).
        token_weighting: "none", or "dynamic": each token's loss at an exit is multiplied by that
            exit's own max softmax probability for it, with no gradient through the weight.
        teacher_hidden: [..., D] final-layer hidden state after the final norm (frozen: no gradient).
        teacher_head_weight: [V, D] LM head.
        kd_alpha: per-token loss = (1 - kd_alpha) * CE + kd_alpha * T^2 * KL(p_teacher || p_exit).
        kd_temperature: T, softens both distributions in the KL term.
        normalizer: divides the summed losses; pass the global valid-token count of the whole
            accumulated batch so gradient accumulation and data parallelism stay exact. Default:
            this call's valid-token count.
        chunk_size: tokens per chunk; peak extra memory is a few [chunk_size, V] fp32 tensors.
        return_top1: also return each exit's (and the teacher's) argmax at every position with a
            target (`IGNORE_INDEX` where there is none: those positions skip the heads).
        vocab_shard: the heads (and teacher head) hold only this rank's vocabulary rows (tensor
            parallel); every rank of its group must call with the same hiddens and targets.

    Logits are computed in the input dtype (bf16 works); softmax, losses and sums in fp32.
    The returned loss supports one backward (the gradients are computed here, in forward).
    """
    args = _check_args(hiddens, head_weights, targets, exit_weights, token_weighting, teacher_hidden,
                       teacher_head_weight, kd_alpha, kd_temperature, normalizer, chunk_size, vocab_shard)
    # Distinct head tensors by identity: a shared head is one input with one gradient buffer.
    distinct: dict[int, int] = {}
    heads: list[torch.Tensor] = []
    for w in args.heads:
        if id(w) not in distinct:
            distinct[id(w)] = len(heads)
            heads.append(w)
    head_slot = tuple(distinct[id(w)] for w in args.heads)
    loss, sums, exit_top1, teacher_top1 = _FusedExitLoss.apply(
        args, head_slot, return_top1, torch.is_grad_enabled(), *args.hiddens, *heads
    )
    return _build_output(args, loss, sums, exit_top1 if return_top1 else None,
                         teacher_top1 if return_top1 and args.teacher_hidden is not None else None, return_top1)


# --- reference -----------------------------------------------------------------------------------


def exit_losses_reference(
    hiddens: dict[int, torch.Tensor],
    head_weights: dict[int, torch.Tensor],
    targets: torch.Tensor,
    exit_weights: dict[int, float],
    *,
    token_weighting: str = "none",
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head_weight: Optional[torch.Tensor] = None,
    kd_alpha: float = 0.0,
    kd_temperature: float = 1.0,
    normalizer: Optional[float] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_top1: bool = False,
) -> ExitLossOutput:
    """Same contract as `exit_losses`, written plainly: full [N, V] logits and autograd. For tests."""
    args = _check_args(hiddens, head_weights, targets, exit_weights, token_weighting, teacher_hidden,
                       teacher_head_weight, kd_alpha, kd_temperature, normalizer, chunk_size)
    alpha, temp = args.kd_alpha, args.temperature
    valid = (args.targets != IGNORE_INDEX).float()
    teacher_log_q = teacher_top1 = None
    if args.teacher_hidden is not None and args.teacher_head is not None:
        teacher_logits = F.linear(args.teacher_hidden, args.teacher_head).float()
        teacher_log_q = F.log_softmax(teacher_logits / temp, dim=-1)
        teacher_top1 = teacher_logits.argmax(dim=-1)

    total = torch.zeros((), dtype=torch.float32, device=args.targets.device)
    rows, tops = [], []
    for h, w, exit_weight in zip(args.hiddens, args.heads, args.exit_weights):
        logits = F.linear(h, w).float()
        ce = F.cross_entropy(logits, args.targets, ignore_index=IGNORE_INDEX, reduction="none")
        max_prob = F.softmax(logits, dim=-1).max(dim=-1).values.detach()
        loss, kd, agree = ce, torch.zeros_like(ce), torch.zeros_like(ce)
        if teacher_log_q is not None and teacher_top1 is not None:
            log_p = F.log_softmax(logits / temp, dim=-1)
            kd = temp**2 * F.kl_div(log_p, teacher_log_q, log_target=True, reduction="none").sum(dim=-1)
            loss = (1 - alpha) * ce + alpha * kd
            agree = (logits.argmax(dim=-1) == teacher_top1).float()
        token_weight = valid * max_prob if args.dynamic else valid
        weighted = exit_weight * (token_weight * loss).sum() / args.normalizer
        total = total + weighted
        rows.append(torch.stack([weighted, (valid * ce).sum(), (valid * kd).sum(),
                                 (valid * max_prob).sum(), (valid * agree).sum()]).detach())
        tops.append(torch.where(valid.bool(), logits.argmax(dim=-1), IGNORE_INDEX))
    if teacher_top1 is not None:
        teacher_top1 = torch.where(valid.bool(), teacher_top1, IGNORE_INDEX)
    return _build_output(args, total, torch.stack(rows), torch.stack(tops), teacher_top1, return_top1)
