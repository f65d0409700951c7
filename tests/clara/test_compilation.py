"""torch.compile of CLARA (clara.compilation) and through the engine: the same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._functorch.config as functorch_config
from torch.utils.data import Dataset

from clara.compilation import compile_model, compile_units, set_recompute, set_tuning
from clara.engine import TrainConfig, Trainer
from clara.loss import ContrastiveLoss
from clara.model import Clara
from clara.model_config import load_model_config
from clara.perceiver import CrossAttention, GEGLUFeedForward, LatentBlock
from clara.text_encoder import TextLayer

# Dropout off: compiled kernels draw their own random masks, so only a dropout-free model can match.
OVERRIDES = ["text.dropout=0.0"]


@pytest.fixture(autouse=True)
def default_recompute():
    """compile_model's recompute level and tuning are process-wide: give later tests PyTorch's defaults back."""
    yield
    set_recompute("default")
    set_tuning(False)


def test_compile_units_are_the_repeated_blocks():
    model = Clara(load_model_config("tiny"))
    units = compile_units(model)
    kinds = [type(unit) for unit in units]
    config = model.config
    assert kinds == [CrossAttention, GEGLUFeedForward] + [LatentBlock] * config.audio.layers + [TextLayer] * config.text.layers
    # The feed-forward inside each latent block is compiled as part of its block, not on its own.
    assert all(unit is not block.ff for unit in units for block in model.audio.perceiver.layers)


def test_bad_scope_or_mode_is_rejected():
    model = Clara(load_model_config("tiny"))
    with pytest.raises(ValueError, match="compile scope 'layers'"):
        compile_model(model, "layers")
    with pytest.raises(ValueError, match="compile mode 'fast'"):
        compile_model(model, "blocks", "fast")
    with pytest.raises(ValueError, match="compile recompute 'all'"):
        compile_model(model, "blocks", recompute="all")
    with pytest.raises(ValueError, match="no blocks to compile"):
        compile_model(torch.nn.Linear(2, 2), "blocks")
    assert compile_model(model, "off") is model


class Pairs(Dataset):
    """Fixed random (mel, tokens) pairs of varying lengths."""

    def __init__(self, size: int = 8):
        g = torch.Generator().manual_seed(0)
        self.frames = torch.randint(30, 60, (size,), generator=g)
        self.mels = [torch.randn(80, int(n), generator=g) for n in self.frames]
        self.tokens = [torch.randint(1, 1000, (int(n),), generator=g) for n in torch.randint(3, 9, (size,), generator=g)]

    def __len__(self) -> int:
        return len(self.mels)

    def __getitem__(self, index: int):
        return self.mels[index], self.tokens[index]


def collate(items):
    mels, tokens = zip(*items)
    mel = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)  # [B, 80, T]
    ids = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True)  # [B, L]
    return mel, ids, torch.tensor([m.shape[1] for m in mels]), torch.tensor([len(t) for t in tokens])


class ContrastiveTask:
    def __init__(self):
        self.loss = ContrastiveLoss()

    def training_step(self, model, batch):
        out = model(*batch)
        return self.loss(out.audio_embeds, out.text_embeds, out.audio_scale, out.text_scale), {}


def test_compile_tuning_reaches_inductor_through_the_engine(tmp_path):
    """train.compile_tuning turns inductor's coordinate-descent tuning on for the run's compilation,
    and a run without it (or not compiled) leaves it off."""
    import torch._inductor.config as inductor_config

    def tuning_after(**settings) -> bool:
        config = TrainConfig(steps=1, batch_size=4, device="cpu", progress=False, out_dir=str(tmp_path / "run"), **settings)
        Trainer(config, Clara(load_model_config("tiny", OVERRIDES)), ContrastiveTask(), Pairs(), collate_fn=collate)
        return inductor_config.coordinate_descent_tuning

    assert tuning_after(compile="blocks", compile_tuning=True) is True
    assert tuning_after(compile="blocks") is False
    set_tuning(True)
    assert tuning_after(compile="off", compile_tuning=False) is True  # not compiling touches nothing


def train(tmp_path, compile_scope: str, recompute: str = "default") -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Clara(load_model_config("tiny", OVERRIDES))
    config = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, cycle_steps=0, log_every=1, device="cpu",
                         eval_at_start=False, progress=False, out_dir=str(tmp_path / compile_scope), compile=compile_scope,
                         compile_recompute=recompute)  # fmt: skip
    result = Trainer(config, model, ContrastiveTask(), Pairs(), collate_fn=collate).fit()
    return [r["train/loss"] for r in result.history], model.state_dict()


def test_engine_with_compiled_blocks_trains_like_eager(tmp_path):
    """Three steps on batches of different lengths (the cross-attention recompiles with dynamic
    sizes), token dropout on, the backward recomputing elementwise results (compile_recompute):
    losses and weights equal eager's to fp32 rounding, and the state dict keeps its plain parameter
    names (checkpoints are interchangeable)."""
    eager_losses, eager_state = train(tmp_path, "off")
    compiled_losses, compiled_state = train(tmp_path, "blocks", "pointwise")
    assert functorch_config.ban_recompute_materialized_backward is False  # the engine passed it on
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    assert list(compiled_state) == list(eager_state)
    for name, value in eager_state.items():
        # The key part of the text layers' QKV bias has a gradient of exactly zero (softmax ignores a
        # shift shared by all keys); Adam's normalisation turns its rounding noise into updates.
        atol = 1e-4 if name.endswith("qkv.bias") else 1e-5
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=atol, msg=name)
    assert eager_losses[0] != pytest.approx(eager_losses[-1], abs=1e-3)  # it did train


def saved_bytes_per_row(block: torch.nn.Module, batch: int, latents: int, width: int, recompute: str = "default") -> float:
    """Bytes autograd keeps for backward per latent row of a compiled block under bf16 autocast
    (the difference between two batch sizes, so the saved bf16 weight copies cancel)."""
    totals = []
    for size in (batch, 2 * batch):
        torch._dynamo.reset()
        compiled = compile_model(copy.deepcopy(block), "model", recompute=recompute)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(size, latents, width, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(x.to(torch.bfloat16))
        totals.append(total)
    return (totals[1] - totals[0]) / (batch * latents)


def test_selective_recompute_keeps_less_for_backward():
    """Compiled, a latent block with selective recomputation no longer keeps its a·GELU(g) product
    ([rows, ff_mult·D] in bf16) nor its normalised copies; it still keeps the matmul outputs."""
    from clara.perceiver import LatentBlock

    config = load_model_config("tiny").audio
    plain = saved_bytes_per_row(LatentBlock(config, "sdpa"), 2, config.num_latents, config.latent_dim)
    selective = saved_bytes_per_row(LatentBlock(config, "sdpa", selective_recompute=True), 2, config.num_latents,
                                    config.latent_dim)
    geglu_product = config.ff_mult * config.latent_dim * 2
    qkv_and_fc1 = (3 * config.latent_heads * config.latent_dim_head + 2 * config.ff_mult * config.latent_dim) * 2
    assert selective <= plain - geglu_product
    assert selective >= qkv_and_fc1


def test_pointwise_recompute_keeps_less_and_computes_the_same():
    """Compiled with recompute="pointwise", a latent block keeps neither its a·GELU(g) product nor
    its two normalised copies for backward (each recomputed from what is kept anyway), but still
    every matmul output: nothing is run twice but elementwise work.  Its output and gradients
    (fp32) equal the eager block's."""
    config = load_model_config("tiny").audio
    torch.manual_seed(0)
    block = LatentBlock(config, "sdpa")
    rows, width = config.num_latents, config.latent_dim
    plain = saved_bytes_per_row(block, 2, rows, width)
    pointwise = saved_bytes_per_row(block, 2, rows, width, "pointwise")
    geglu_product, norm_outputs = config.ff_mult * width * 2, 2 * width * 2  # bf16 bytes per row
    norm_statistics = 2 * 2 * 4  # what recomputing the norms may keep instead: mean and rstd of each, fp32
    qkv_and_fc1 = (3 * config.latent_heads * config.latent_dim_head + 2 * config.ff_mult * width) * 2
    assert pointwise <= plain - geglu_product - norm_outputs + norm_statistics
    assert pointwise >= qkv_and_fc1

    torch._dynamo.reset()
    compiled = compile_model(copy.deepcopy(block), "model", recompute="pointwise")
    x = torch.randn(3, rows, width)
    outputs, grads = [], []
    for module in (block, compiled):
        module.zero_grad()
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        (out * torch.linspace(-1, 1, width)).sum().backward()
        outputs.append(out)
        grads.append([inputs.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


# Varied padded batches: (frames, token count) of the longest item; the other two are shorter.
VARIED_SHAPES = [(50, 7), (64, 9), (80, 5), (96, 11), (45, 8)]


def varied_batch(frames: int, words: int) -> tuple[torch.Tensor, ...]:
    """mel [3, 80, frames], tokens [3, words] and the lengths of three items, masks on."""
    g = torch.Generator().manual_seed(frames)
    mel, tokens = torch.randn(3, 80, frames, generator=g), torch.randint(1, 1000, (3, words), generator=g)
    return mel, tokens, torch.tensor([frames, frames - 10, 12]), torch.tensor([words, 3, 2])


def step_results(model: Clara, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(audio embeds, text embeds, {name: gradient}) of one training step from a fixed RNG state."""
    model.zero_grad()
    torch.manual_seed(1)
    out = model(*batch)
    (out.audio_embeds @ out.text_embeds.T).logsumexp(-1).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.audio_embeds.detach(), out.text_embeds.detach(), grads


def assert_matches_reference(got, want, rtol: float, atol: float) -> None:
    for got_embeds, want_embeds in zip(got[:2], want[:2]):
        torch.testing.assert_close(got_embeds, want_embeds, rtol=rtol, atol=atol)
    # A compiled graph is one autograd node, so parameters it reads but the objective does not (the
    # temperatures here) get zero gradients rather than none; eager leaves them at None.
    assert want[2].keys() <= got[2].keys()
    assert all(got[2][name].abs().max() == 0 for name in got[2].keys() - want[2].keys())
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_varied_lengths_compile_once_more_not_once_per_length(scope):
    """compile_model promises one recompilation with dynamic sizes when lengths change, not one per
    new length (each would cost a compile, and under CUDA graphs a recording).  Five padded batches
    of different clip and text lengths, token dropout on: after the second shape no frame is compiled
    again, and every step's embeddings and gradients equal the eager-attention eager model's
    (rtol 1e-5, atol 1e-6; aot_eager: the compiler's graphs and decompositions, no generated kernels,
    so this stays fast and draws token dropout from the same generator as eager)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    reference = Clara(load_model_config("tiny", [*OVERRIDES, "attention=eager"])).train()
    assert reference.config.audio.token_keep < 1
    compiled = Clara(load_model_config("tiny", OVERRIDES)).train()
    compiled.load_state_dict(reference.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compile_model(compiled, scope, backend=counter)
    frames = []
    for shape in VARIED_SHAPES:
        batch = varied_batch(*shape)
        assert_matches_reference(step_results(compiled, batch), step_results(reference, batch), rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    first = len({type(unit) for unit in compile_units(compiled)}) if scope == "blocks" else 1  # one class shares its code
    assert frames[0] == first
    assert frames[1] <= 2 * first and frames[1:] == [frames[1]] * (len(frames) - 1), frames


@pytest.mark.slow
def test_whole_model_compiled_by_inductor_matches_the_eager_reference():
    """The whole model under inductor's generated CPU kernels (forward and backward), on padded
    batches of three lengths with masks on: embeddings and gradients equal the eager-attention fp32
    model's within rtol 1e-4 / atol 1e-5 (measured 3e-7), and it compiles twice (static, then dynamic
    sizes).  About 80 s on two CPU cores."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    overrides = [*OVERRIDES, "audio.token_keep=1.0"]  # inductor's kernels draw their own random numbers
    torch.manual_seed(0)
    reference = Clara(load_model_config("tiny", [*overrides, "attention=eager"])).train()
    compiled = Clara(load_model_config("tiny", overrides)).train()
    compiled.load_state_dict(reference.state_dict())
    counter = CompileCounterWithBackend("inductor")
    compile_model(compiled, "model", backend=counter)
    for shape in VARIED_SHAPES[:3]:
        batch = varied_batch(*shape)
        assert_matches_reference(step_results(compiled, batch), step_results(reference, batch), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 2


@pytest.mark.parametrize("recompute", ["pointwise", "aggressive"])
def test_recompute_levels_keep_the_block_numbers(recompute):
    """Every train.compile_recompute level changes only what the partitioner keeps for backward: a
    latent block compiled with it (aot_eager_decomp_partition: inductor's decompositions and
    partitioner without generated kernels, so it is quick) gives the eager block's output and input
    and weight gradients (fp32, rtol 1e-5, atol 1e-6)."""
    config = load_model_config("tiny").audio
    torch.manual_seed(0)
    block = LatentBlock(config, "eager")
    torch._dynamo.reset()
    compiled = compile_model(copy.deepcopy(block), "model", recompute=recompute, backend="aot_eager_decomp_partition")
    x = torch.randn(3, config.num_latents, config.latent_dim)
    results = []
    for module in (block, compiled):
        inputs = x.clone().requires_grad_()
        out = module(inputs)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, config.latent_dim)).sum(), [inputs, *module.parameters()])
        results.append((out.detach(), *grads))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
