"""Fused chunked exit losses: equal to the full-logits reference, hand-checked values, memory, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from eetune.data import IGNORE_INDEX
from eetune.errors import EetuneError
from eetune.train.losses import ExitLossOutput, exit_losses, exit_losses_reference

LAYERS = (2, 4, 6)
EXIT_WEIGHTS = {2: 0.3, 4: 1.0, 6: 0.7}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tensors are tiny: with a second OpenMP thread on a busy 2-core box each op waits on the
    other thread and the module runs 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Case:
    hiddens: dict[int, torch.Tensor]
    heads: dict[int, torch.Tensor]
    targets: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_head: torch.Tensor


def make_case(
    n: int = 37, dim: int = 16, vocab: int = 50, *, trainable: str = "one", dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """Fresh leaf tensors (identical for a given seed). Exits 2 and 6 share the LM head.

    trainable: "one" = exit 4 has its own trainable head, the LM head is frozen;
               "shared" = the LM head shared by exits 2 and 6 is itself trainable.
    """
    gen = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(vocab, dim, generator=gen)
    own_head = torch.randn(vocab, dim, generator=gen)
    hiddens = {layer: (0.4 * torch.randn(n, dim, generator=gen)).to(dtype).requires_grad_() for layer in LAYERS}
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::4] = IGNORE_INDEX
    teacher_hidden = (0.4 * torch.randn(n, dim, generator=gen)).to(dtype)
    lm_head = lm_head.to(dtype).requires_grad_(trainable == "shared")
    own_head = own_head.to(dtype).requires_grad_(True)
    return Case(hiddens, {2: lm_head, 4: own_head, 6: lm_head}, targets, teacher_hidden, lm_head.detach())


def run(fn: Callable[..., ExitLossOutput], case: Case, **kwargs: Any) -> ExitLossOutput:
    out = fn(case.hiddens, case.heads, case.targets, EXIT_WEIGHTS, **kwargs)
    out.loss.backward()
    return out


def teacher_kwargs(case: Case, alpha: float, temperature: float = 1.0) -> dict[str, Any]:
    return dict(teacher_hidden=case.teacher_hidden, teacher_head_weight=case.teacher_head, kd_alpha=alpha,
                kd_temperature=temperature)


MODES = {
    "ce": dict(),
    "dynamic": dict(token_weighting="dynamic"),
    "teacher-stats-only": dict(kd=(0.0, 1.0)),
    "kd0.5": dict(kd=(0.5, 1.0)),
    "kd1.0": dict(kd=(1.0, 1.0)),
    "kd0.5-T2-dynamic": dict(kd=(0.5, 2.0), token_weighting="dynamic"),
    "kd1.0-T2": dict(kd=(1.0, 2.0)),
}


def mode_kwargs(case: Case, mode: str) -> dict[str, Any]:
    spec = dict(MODES[mode])
    kd = spec.pop("kd", None)
    return {**spec, **(teacher_kwargs(case, *kd) if kd else {})}


def assert_same_stats(a: ExitLossOutput, b: ExitLossOutput, tol: float = 1e-5) -> None:
    assert a.num_valid == b.num_valid
    for layer in LAYERS:
        for name in ("ce", "weighted_loss", "max_prob", "kd", "agreement"):
            x, y = getattr(a.exits[layer], name), getattr(b.exits[layer], name)
            assert (x is None) == (y is None), name
            if x is not None:
                torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=f"{name} at exit {layer}")


@pytest.mark.parametrize("trainable", ["one", "shared"])
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_matches_reference(mode: str, trainable: str) -> None:
    fused_case, ref_case = make_case(trainable=trainable), make_case(trainable=trainable)
    fused = run(exit_losses, fused_case, chunk_size=8, return_top1=True, **mode_kwargs(fused_case, mode))
    ref = run(exit_losses_reference, ref_case, return_top1=True, **mode_kwargs(ref_case, mode))

    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert abs(fused.loss.item() - sum(s.weighted_loss.item() for s in fused.exits.values())) < 1e-5
    assert_same_stats(fused, ref)
    for layer in LAYERS:
        torch.testing.assert_close(fused_case.hiddens[layer].grad, ref_case.hiddens[layer].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_case.heads[4].grad, ref_case.heads[4].grad, rtol=1e-5, atol=1e-5)
    if trainable == "shared":  # one tensor used by two exits: both contributions accumulate
        torch.testing.assert_close(fused_case.heads[2].grad, ref_case.heads[2].grad, rtol=1e-5, atol=1e-5)
    else:
        assert fused_case.heads[2].grad is None and ref_case.heads[2].grad is None
    assert fused.exit_top1 is not None and ref.exit_top1 is not None
    for layer in LAYERS:
        assert torch.equal(fused.exit_top1[layer], ref.exit_top1[layer])
    assert (fused.teacher_top1 is None) == ("teacher_hidden" not in mode_kwargs(fused_case, mode))
    if fused.teacher_top1 is not None:
        assert ref.teacher_top1 is not None and torch.equal(fused.teacher_top1, ref.teacher_top1)


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size: int) -> None:
    base_case, case = make_case(), make_case()
    base = run(exit_losses, base_case, chunk_size=8, **teacher_kwargs(base_case, 0.5, 2.0))
    out = run(exit_losses, case, chunk_size=chunk_size, **teacher_kwargs(case, 0.5, 2.0))
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(case.hiddens[4].grad, base_case.hiddens[4].grad, rtol=1e-6, atol=1e-6)


def test_global_normalizer_makes_gradient_accumulation_exact() -> None:
    whole_case, split_case = make_case(trainable="shared"), make_case(trainable="shared")
    whole = run(exit_losses, whole_case, token_weighting="dynamic", chunk_size=8)
    total_valid = int((split_case.targets != IGNORE_INDEX).sum())
    losses = []
    for part in (slice(0, 20), slice(20, 37)):  # two micro-batches, normalised by the global count
        out = exit_losses({k: h[part] for k, h in split_case.hiddens.items()}, split_case.heads,
                          split_case.targets[part], EXIT_WEIGHTS, token_weighting="dynamic", chunk_size=8,
                          normalizer=total_valid)
        out.loss.backward()
        losses.append(out.loss)
    torch.testing.assert_close(losses[0] + losses[1], whole.loss, rtol=1e-6, atol=1e-6)
    for layer in LAYERS:
        torch.testing.assert_close(split_case.hiddens[layer].grad, whole_case.hiddens[layer].grad)
    torch.testing.assert_close(split_case.heads[2].grad, whole_case.heads[2].grad, rtol=1e-5, atol=1e-6)


def test_backward_scales_by_grad_output() -> None:
    unit_case, scaled_case = make_case(), make_case()
    run(exit_losses, unit_case, chunk_size=8)
    (2.5 * exit_losses(scaled_case.hiddens, scaled_case.heads, scaled_case.targets, EXIT_WEIGHTS,
                       chunk_size=8).loss).backward()
    torch.testing.assert_close(scaled_case.hiddens[6].grad, 2.5 * unit_case.hiddens[6].grad)
    torch.testing.assert_close(scaled_case.heads[4].grad, 2.5 * unit_case.heads[4].grad)


def test_all_targets_ignored_gives_zero_loss_and_gradients() -> None:
    case = make_case()
    case.targets.fill_(IGNORE_INDEX)
    out = run(exit_losses, case, chunk_size=8, token_weighting="dynamic", **teacher_kwargs(case, 0.5, 2.0))
    assert out.num_valid == 0 and out.loss.item() == 0.0
    assert torch.count_nonzero(case.hiddens[2].grad) == 0 and torch.count_nonzero(case.heads[4].grad) == 0


def test_batched_shapes_and_agreement() -> None:
    """[B, S, D] hiddens with [B, S] targets; an exit identical to the teacher agrees everywhere."""
    case = make_case(n=24)
    hiddens = {k: h.detach().reshape(4, 6, -1).requires_grad_() for k, h in case.hiddens.items()}
    teacher = hiddens[2].detach()
    out = exit_losses(hiddens, case.heads, case.targets.reshape(4, 6), EXIT_WEIGHTS, teacher_hidden=teacher,
                      teacher_head_weight=case.teacher_head, kd_alpha=0.5, chunk_size=5, return_top1=True)
    out.loss.backward()
    assert hiddens[2].grad is not None and hiddens[2].grad.shape == (4, 6, 16)
    assert out.exit_top1 is not None and out.exit_top1[4].shape == (4, 6)
    assert out.teacher_top1 is not None and torch.equal(out.exit_top1[2], out.teacher_top1)
    assert out.exits[2].agreement is not None and out.exits[2].agreement.item() == 1.0
    assert out.exits[2].kd is not None and abs(out.exits[2].kd.item()) < 1e-5


# --- hand-computed values ---------------------------------------------------------------------------
# V=3, D=2, head = [[1,0],[0,1],[0,0]] so logits = (h0, h1, 0). Three tokens, the last ignored:
#   token 1: h=(1,0) -> logits (1,0,0), target 0;   token 2: h=(0,1) -> logits (0,1,0), target 2.
#   teacher: h=(0,1) -> (0,1,0) and h=(1,0) -> (1,0,0): the exit's distributions swapped.
# Every softmax has denominator Z = e + 2 (at T=2: Zt = sqrt(e) + 2).

E = math.e
Z = E + 2


def tiny_inputs(trainable_head: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=trainable_head)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, -3.0]], requires_grad=True)
    return {1: hidden}, {1: head}, torch.tensor([0, 2, IGNORE_INDEX])


TEACHER_HIDDEN = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])


@pytest.mark.parametrize("fn", [exit_losses, exit_losses_reference])
def test_hand_computed_ce_and_gradient(fn: Callable[..., ExitLossOutput]) -> None:
    hiddens, heads, targets = tiny_inputs()
    out = fn(hiddens, heads, targets, {1: 0.5}, chunk_size=2)
    out.loss.backward()
    ce1 = math.log(Z) - 1  # -log(e / Z)
    ce2 = math.log(Z)  # -log(1 / Z)
    assert out.num_valid == 2
    assert out.exits[1].ce.item() == pytest.approx((ce1 + ce2) / 2, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * (ce1 + ce2) / 2, rel=1e-6)
    assert out.exits[1].max_prob.item() == pytest.approx(E / Z, rel=1e-6)
    # dloss/dlogits = w * (softmax - onehot) / 2; the head maps logits 0 and 1 back to h0 and h1.
    expected = torch.tensor([
        [0.5 * (E / Z - 1) / 2, 0.5 * (1 / Z) / 2],
        [0.5 * (1 / Z) / 2, 0.5 * (E / Z) / 2],
        [0.0, 0.0],
    ])
    torch.testing.assert_close(hiddens[1].grad, expected)


@pytest.mark.parametrize("fn", [exit_losses, exit_losses_reference])
def test_hand_computed_dynamic_weighting(fn: Callable[..., ExitLossOutput]) -> None:
    hiddens, heads, targets = tiny_inputs()
    out = fn(hiddens, heads, targets, {1: 1.0}, token_weighting="dynamic", chunk_size=2)
    out.loss.backward()
    weight = E / Z  # both tokens' max probability
    ce1, ce2 = math.log(Z) - 1, math.log(Z)
    assert out.loss.item() == pytest.approx(weight * (ce1 + ce2) / 2, rel=1e-6)
    # No gradient through the weight: the CE gradient, scaled by it.
    assert hiddens[1].grad[1, 1].item() == pytest.approx(weight * (E / Z) / 2, rel=1e-6)


@pytest.mark.parametrize("fn", [exit_losses, exit_losses_reference])
def test_hand_computed_kd(fn: Callable[..., ExitLossOutput]) -> None:
    # T=1, token 1: q = (1, e, 1)/Z, p = (e, 1, 1)/Z; KL = sum q log(q/p) = (1/Z)(-1) + (e/Z)(1) = (e-1)/Z.
    # Token 2 is the mirror image: same KL.
    hiddens, heads, targets = tiny_inputs()
    out = fn(hiddens, heads, targets, {1: 1.0}, teacher_hidden=TEACHER_HIDDEN, teacher_head_weight=heads[1],
             kd_alpha=0.5, chunk_size=2)
    kl = (E - 1) / Z
    ce_mean = (2 * math.log(Z) - 1) / 2
    assert out.exits[1].kd is not None and out.exits[1].kd.item() == pytest.approx(kl, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.5 * ce_mean + 0.5 * kl, rel=1e-6)
    assert out.exits[1].agreement is not None and out.exits[1].agreement.item() == 0.0

    # T=2: logits halve, s = e^(1/2), Zt = s + 2; KL = (1/Zt)(-1/2) + (s/Zt)(1/2) = (s-1)/(2 Zt), times T^2 = 4.
    hiddens, heads, targets = tiny_inputs()
    out = fn(hiddens, heads, targets, {1: 1.0}, teacher_hidden=TEACHER_HIDDEN, teacher_head_weight=heads[1],
             kd_alpha=1.0, kd_temperature=2.0, chunk_size=2)
    out.loss.backward()
    s = math.sqrt(E)
    zt = s + 2
    assert out.loss.item() == pytest.approx(4 * (s - 1) / (2 * zt), rel=1e-6)
    # dloss/dlogits = T * (p_T - q) / 2 per token; token 1: p_T = (s,1,1)/Zt, q = (1,s,1)/Zt.
    expected_row1 = [2 * (s - 1) / zt / 2, 2 * (1 - s) / zt / 2]
    torch.testing.assert_close(hiddens[1].grad[0], torch.tensor(expected_row1))


# --- bf16 -------------------------------------------------------------------------------------------


def test_bf16_agrees_with_fp32_reference() -> None:
    bf = make_case(n=64, dim=32, vocab=128, dtype=torch.bfloat16, seed=3)
    fp = make_case(n=64, dim=32, vocab=128, dtype=torch.bfloat16, seed=3)
    # The fp32 reference sees exactly the bf16 values, upcast.
    fp.hiddens = {k: h.detach().float().requires_grad_() for k, h in fp.hiddens.items()}
    lm_head = fp.heads[2].detach().float()
    fp.heads = {2: lm_head, 4: fp.heads[4].detach().float().requires_grad_(), 6: lm_head}
    fp.teacher_hidden, fp.teacher_head = fp.teacher_hidden.float(), lm_head
    kwargs = dict(token_weighting="dynamic")
    out = run(exit_losses, bf, chunk_size=24, **kwargs, **teacher_kwargs(bf, 0.5, 2.0))
    ref = run(exit_losses_reference, fp, **kwargs, **teacher_kwargs(fp, 0.5, 2.0))

    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=1e-3)
    grads = [(bf.hiddens[k].grad, fp.hiddens[k].grad) for k in LAYERS] + [(bf.heads[4].grad, fp.heads[4].grad)]
    for got, want in grads:
        assert got is not None and want is not None and got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()).item() < 3e-2
    assert bf.heads[2].grad is None


# --- memory -----------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


@pytest.mark.parametrize("mode", ["ce", "kd0.5-T2-dynamic"])
def test_full_logits_never_exist(mode: str) -> None:
    n, vocab, chunk = 1024, 2048, 128
    largest = {}
    for name, fn in (("fused", exit_losses), ("reference", exit_losses_reference)):
        case = make_case(n=n, dim=16, vocab=vocab)
        with LargestTensor() as probe:
            run(fn, case, chunk_size=chunk, **mode_kwargs(case, mode))
        largest[name] = probe.largest
    assert largest["fused"] <= chunk * vocab
    assert largest["reference"] >= n * vocab  # the probe does see full logits when they are built


class CountMatmuls(TorchDispatchMode):
    def __init__(self, vocab: int = 0) -> None:
        super().__init__()
        self.count = 0
        self.logit_rows = 0  # rows of every [rows, vocab] matmul output: tokens sent through a head
        self.vocab = vocab

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_):
            self.count += 1
            if func.overloadpacket is torch.ops.aten.mm and out.shape[-1] == self.vocab:
                self.logit_rows += out.shape[0]
        return out


def test_gradient_work_only_where_needed() -> None:
    """Per exit and chunk: 1 logits matmul, +1 for the hidden gradient, +1 for a trainable head's."""
    chunks = 4  # 37 tokens, 27 of them with a target, in chunks of 8
    grad_case, eval_case = make_case(), make_case()
    with CountMatmuls() as counter:
        out = exit_losses(grad_case.hiddens, grad_case.heads, grad_case.targets, EXIT_WEIGHTS, chunk_size=8)
    assert counter.count == chunks * (3 + 3 + 1)  # frozen LM head of exits 2 and 6: no weight matmul
    with CountMatmuls() as counter, torch.no_grad():
        evaluated = exit_losses(eval_case.hiddens, eval_case.heads, eval_case.targets, EXIT_WEIGHTS, chunk_size=8)
    assert counter.count == chunks * 3
    assert not evaluated.loss.requires_grad
    torch.testing.assert_close(evaluated.loss, out.loss.detach())


def test_positions_without_a_target_skip_the_heads() -> None:
    case = make_case()
    vocab = case.heads[2].shape[0]
    with CountMatmuls(vocab) as counter, torch.no_grad():
        out = exit_losses(case.hiddens, case.heads, case.targets, EXIT_WEIGHTS, chunk_size=8, return_top1=True,
                          **teacher_kwargs(case, alpha=0.5))
    valid = case.targets != IGNORE_INDEX
    assert out.num_valid == int(valid.sum()) < case.targets.numel()
    assert counter.logit_rows == (len(LAYERS) + 1) * out.num_valid  # every exit's head and the teacher's
    assert out.exit_top1 is not None and out.teacher_top1 is not None
    for top1 in (*out.exit_top1.values(), out.teacher_top1):
        assert bool((top1[~valid] == IGNORE_INDEX).all()) and bool((top1[valid] >= 0).all())


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kd_alpha=0.5), "needs the final layer as teacher"),
        (dict(token_weighting="confidence"), "token_weighting must be one of"),
        (dict(kd_alpha=1.5, teacher=True), r"kd_alpha must be a number in \[0, 1\]"),
        (dict(kd_alpha=-0.1, teacher=True), r"kd_alpha must be a number in \[0, 1\]"),
        (dict(kd_temperature=0.0, teacher=True), "kd_temperature must be"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(normalizer=0.0), "normalizer must be"),
        (dict(teacher_hidden_only=True), "pass both or neither"),
    ],
)
def test_bad_options_raise_eetune_error(kwargs: dict[str, Any], message: str) -> None:
    case = make_case()
    kwargs = dict(kwargs)
    if kwargs.pop("teacher", False):
        kwargs.update(teacher_hidden=case.teacher_hidden, teacher_head_weight=case.teacher_head)
    if kwargs.pop("teacher_hidden_only", False):
        kwargs.update(teacher_hidden=case.teacher_hidden)
    for fn in (exit_losses, exit_losses_reference):
        with pytest.raises(EetuneError, match=message):
            fn(case.hiddens, case.heads, case.targets, EXIT_WEIGHTS, **kwargs)


def test_inconsistent_tensors_raise_value_error() -> None:
    case = make_case()
    with pytest.raises(ValueError, match="must name the same exits"):
        exit_losses(case.hiddens, case.heads, case.targets, {2: 1.0})
    with pytest.raises(ValueError, match="expected targets' shape"):
        exit_losses(case.hiddens, case.heads, case.targets[:10], EXIT_WEIGHTS)
    bad_targets = case.targets.clone()
    bad_targets[1] = 50
    with pytest.raises(ValueError, match=r"token ids in \[0, 50\)"):
        exit_losses(case.hiddens, case.heads, bad_targets, EXIT_WEIGHTS)
