"""What only a CUDA GPU can check: bf16 kernels, CUDA decoding and the fused loss on the device.

Every test here is marked `cuda` and skips without a GPU; `scripts/gpu_check.sh` runs them
(`pytest -m cuda`) on the day a GPU machine is available.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics
from torchtune.models.llama3_2._component_builders import llama3_2

from eetune.data import IGNORE_INDEX
from eetune.exits.model import EarlyExitModel
from eetune.exits.spec import ExitSpec
from eetune.infer import DecodeSettings, Engine
from eetune.models import BaseModel, load_base_model
from eetune.train.losses import exit_losses, exit_losses_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]


def _tiny_exit_model(device: str) -> EarlyExitModel:
    torch.manual_seed(0)
    backbone = llama3_2(
        vocab_size=256, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=256,
        intermediate_dim=128, rope_base=100000, scale_factor=1, norm_eps=1e-5, tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    specs = [ExitSpec(1, "layer", init="random"), ExitSpec(2, "mlp", init="random"), ExitSpec(3, "norm", init="random")]
    return EarlyExitModel(backbone, specs).eval().to(device)


def test_smollm2_bf16_on_cuda_is_as_close_to_fp32_as_transformers(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = load_base_model("smollm2_135m", checkpoint_dir=smollm2_dir, dtype="bfloat16", device="cuda")
    ids = ours.tokenizer(topics["assert"][:320], return_tensors="pt").input_ids.cuda()
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).cuda().eval()
    hf_bf16 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        exact = reference(ids).logits.float()
        our_error = (ours.model(ids).float() - exact).abs().mean().item()
        hf_error = (hf_bf16(ids).logits.float() - exact).abs().mean().item()
    print(f"\nbf16 on CUDA, mean |logit error| vs fp32: ours {our_error:.4f}, transformers {hf_error:.4f}")
    assert our_error <= 1.5 * hf_error + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_self_speculative_equals_full_and_batches_equal_solo(dtype: torch.dtype) -> None:
    model = _tiny_exit_model("cuda").to(dtype)
    engine = Engine(model, max_batch_size=3)
    prompts = [[1, 5, 9, 200, 17], [1, 33], [1, 7, 7, 7, 90, 91, 92, 93]]
    for prompt in prompts:
        full = engine.generate(prompt, DecodeSettings(max_new_tokens=24))
        assert len(full.tokens) == 24
        if dtype == torch.float32:  # bf16 verify (k tokens at once) may round differently from 1-token steps
            spec = engine.generate(prompt, DecodeSettings(mode="self_speculative", draft_exit=2, draft_len=3,
                                                          max_new_tokens=24))
            assert spec.tokens == full.tokens
    if dtype == torch.float32:
        settings = DecodeSettings(mode="early_exit", threshold=0.018, max_new_tokens=16)
        solo = [engine.generate(p, settings).tokens for p in prompts]
        assert [r.tokens for r in engine.generate_batch(prompts, settings)] == solo


def test_cuda_decoding_agrees_with_cpu() -> None:
    prompt = [1, 5, 9, 200, 17]
    settings = DecodeSettings(mode="early_exit", threshold=0.018, max_new_tokens=32)
    cpu = Engine(_tiny_exit_model("cpu")).generate(prompt, settings).tokens
    gpu = Engine(_tiny_exit_model("cuda")).generate(prompt, settings).tokens
    # Summation order differs between devices, so a near-tie may flip; most tokens must agree.
    assert sum(a == b for a, b in zip(cpu, gpu)) >= 0.9 * len(cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_exit_loss_on_cuda_matches_the_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n, dim, vocab = 300, 64, 1000

    def case() -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        hiddens = {k: (0.4 * torch.randn(n, dim, generator=g)).to("cuda", dtype).requires_grad_() for k in (2, 4)}
        head = torch.randn(vocab, dim, generator=g).to("cuda", dtype)
        return hiddens, {2: head, 4: head}, torch.randint(0, vocab, (n,), generator=gen).cuda()

    hiddens, heads, targets = case()
    targets[::5] = IGNORE_INDEX
    ref_hiddens, ref_heads, _ = case()
    weights = {2: 0.5, 4: 1.0}
    fused = exit_losses(hiddens, heads, targets, weights, chunk_size=64)
    fused.loss.backward()
    ref = exit_losses_reference({k: h.float().detach().requires_grad_() for k, h in ref_hiddens.items()},
                                {k: h.float() for k, h in ref_heads.items()}, targets, weights)
    ref.loss.backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.loss.float(), ref.loss, rtol=tol, atol=tol)


def test_tiny_base_model_loads_on_cuda(tiny_base_model: BaseModel) -> None:
    model = load_base_model("smollm2_135m", checkpoint_dir=tiny_base_model.checkpoint_dir, dtype="bfloat16",
                            device="cuda")
    assert next(model.model.parameters()).device.type == "cuda"
    assert model.fingerprint == tiny_base_model.fingerprint
