"""The benchmark harnesses run on CPU (tiny model) and measure what they say they measure."""

from __future__ import annotations

import re

import pytest
import torch

from bench import arguments as bench_arguments
from bench import bench_finetune_epoch, bench_memory, bench_prepare, bench_step
from bench.workloads import frames_range, meld_like_frames
from clara.loss import ContrastiveLoss


def test_variant_names_parse_into_settings():
    v = bench_step.Variant.parse("sdpa-bf16-cudagraphs-bucket-infer-b256")
    assert (v.attention, v.precision, v.scope, v.mode, v.lengths, v.infer, v.batch) == (
        "sdpa", "bf16", "model", "reduce-overhead", "bucket", True, 256)
    assert bench_step.Variant.parse("eager-fp32").scope == "off"
    assert bench_step.Variant.parse("sdpa-bf16-compile-pointwise").recompute == "pointwise"
    assert bench_step.Variant.parse("sdpa_cudnn-bf16-cudagraphs").attention == "sdpa_cudnn"
    for bad in ("sdpa-fp8", "cudnn-bf16", "sdpa-bf16-fa2", "sdpa-bf16-compile-blocks", "sdpa-bf16-varlen-bucket", "sdpa-bf16-fast",
                "sdpa-bf16-pointwise", "sdpa-bf16-compile-pointwise-aggressive", "sdpa-fp32-bf16res",
                "sdpa-tf32-compile-bf16res", "sdpa-bf16-ckpt-sac"):
        with pytest.raises(SystemExit):
            bench_step.Variant.parse(bad)


def test_meld_like_lengths_follow_meld():
    frames = meld_like_frames(20_000, torch.Generator().manual_seed(0))
    low, high = frames_range()
    assert frames.min() >= low and frames.max() <= high
    # MELD train: median 2.46 s (1 + 2.46 x 93.75 = 231 frames); clipping at 1 s moves it little.
    assert 215 <= frames.median() <= 250


def test_bucketed_batches_pad_less_than_random_ones():
    device = torch.device("cpu")
    padded = {kind: sum(b[0].shape[-1] * b[0].shape[0] for b in bench_step.make_batches(16, kind, device, count=8))
              for kind in ("varlen", "bucket")}
    real = sum(int(b[2].sum()) for b in bench_step.make_batches(16, "bucket", device, count=8))
    assert real < padded["bucket"] < 0.8 * padded["varlen"]
    for mel, tokens, lengths, token_lengths in bench_step.make_batches(4, "varlen", device, count=2):
        assert mel.shape[-1] % bench_step.PAD_MULTIPLE == 0
        assert (mel[0, :, int(lengths[0]):] == 0).all() and (mel[0, :, : int(lengths[0])] != 0).all()


def test_step_benchmark_prints_its_table(capsys):
    bench_step.main(["--config", "tiny", "--variants", "sdpa-fp32,sdpa-bf16-bucket-b4,sdpa-fp32-infer", "--steps", "1"])
    out = capsys.readouterr().out
    table = out[out.index("variant") :].splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:] if line.startswith("sdpa")}
    assert set(rows) == {"sdpa-fp32", "sdpa-bf16-bucket-b4", "sdpa-fp32-infer"}
    assert rows["sdpa-bf16-bucket-b4"][1] == "4"
    assert all(float(row[2]) > 0 for row in rows.values())  # samples/s
    assert float(rows["sdpa-fp32"][6]) > float(rows["sdpa-fp32-infer"][6]) > 0  # training FLOPs > forward FLOPs
    assert all(row[4] == "n/a" and row[5].endswith("%") for row in rows.values())  # no datasheet peak for a CPU
    assert "device: CPU" in out and "MFU against the dense bf16 peak n/a" in out


def test_flops_per_sample_match_a_hand_count():
    """CLARA tiny, mel [4, 80, 282], tokens [4, 32]; 2·m·k·n per product, per sample.  Forward:
    conv1 2·282·240·32 = 4,331,520; conv2 (141 tokens) 2·141·96·32 = 866,304; cross-attention
    (32 latents x 32, 1 head x 16, 70 kept keys of 141) q 32,768 + kv 2·70·32·32 = 143,360 + scores
    and values 2 x 2·32·16·70 = 143,360 + out 32,768; cross GEGLU 2·32·32·128 + 2·32·64·32 = 393,216;
    two latent blocks of qkv 196,608 + scores and values 131,072 + out 65,536 + GEGLU 393,216;
    audio fc and head 4,096; two text layers (32 tokens) of qkv 196,608 + scores and values 131,072
    + out 65,536 + feed-forward 262,144; text project 65,536; text fc and head 4,096; the loss's
    [4, 32] x [32, 4] product 256 per sample: 8,900,864.  Training is 3x that, less conv1's input
    gradient (the mel needs none): 22,371,072.  Inference (eval: all 141 keys, no loss) adds 2 x
    145,408 for kv and attention and drops the loss: 9,191,424."""
    cpu = torch.device("cpu")
    assert bench_step.count_flops_per_sample(False, "tiny", cpu) == 3 * 8_900_864 - 4_331_520 == 22_371_072
    assert bench_step.count_flops_per_sample(True, "tiny", cpu) == 8_900_864 - 256 + 2 * 145_408 == 9_191_424


def test_variable_length_batches_pad_beyond_the_3s_workload():
    """Variable-length rows are credited with the 3 s workload's FLOPs, a lower bound only while
    their padded batches average at least its 282 frames (the frame-dependent work, conv head and
    cross-attention keys, grows with the padded length; the latents' does not)."""
    for batch in (4, 64):
        for kind in ("varlen", "bucket"):
            frames = [b[0].shape[-1] for b in bench_step.make_batches(batch, kind, torch.device("meta"))]
            assert sum(frames) / len(frames) >= bench_step.FRAMES, (batch, kind, frames)


def test_mfu_is_against_the_datasheet_peak_and_ceiling_against_the_measured_matmul():
    assert bench_step.dense_bf16_peak("NVIDIA H100 80GB HBM3") == bench_step.dense_bf16_peak("NVIDIA H200") == 989.4
    assert bench_step.dense_bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert bench_step.dense_bf16_peak("NVIDIA A100-SXM4-80GB") is None
    # The NVL parts peak lower than the SXM ones; "H200" alone would have matched the H200 NVL.
    assert bench_step.dense_bf16_peak("NVIDIA H200 NVL") is None
    assert bench_step.dense_bf16_peak("NVIDIA H100 NVL") is None
    row = {"name": "sdpa-bf16-cudagraphs-bf16res", "batch": 64, "samples_s": 1817.2, "tflops": 378.7,
           "gflop_sample": 208.4, "peak_gib": 10.0, "warmup_s": 60.0}
    cells = bench_step.format_row(row, {"bf16": 767.0, "fp32": 767.0, "tf32": 767.0}, 989.4).split()
    assert cells[4:6] == ["38.3%", "49.4%"]  # 378.7 / 989.4 and 378.7 / 767
    assert bench_step.format_row(row, {"bf16": 767.0}, None).split()[4] == "n/a"


def test_variable_lengths_are_primed_for_graphs_and_timed_over_whole_cycles():
    parse = bench_step.Variant.parse
    batches = list(range(8))  # stand-ins: only their count and order matter here
    # CUDA-graph trees record a shape on its second call: every shape is called twice before timing.
    assert bench_step.priming_batches(parse("sdpa-bf16-cudagraphs-bucket"), batches) == batches * 2
    assert bench_step.priming_batches(parse("sdpa-bf16-maxautotune-varlen"), batches) == batches * 2
    assert bench_step.priming_batches(parse("sdpa-bf16-blocks-varlen"), batches) == batches
    assert bench_step.priming_batches(parse("sdpa-bf16-cudagraphs"), batches) == [0]  # the warm-up steps do the rest
    assert bench_step.timed_steps(parse("sdpa-bf16-bucket"), 20, 8) == 24
    assert bench_step.timed_steps(parse("sdpa-bf16-varlen"), 16, 8) == 16
    assert bench_step.timed_steps(parse("sdpa-bf16"), 20, 8) == 20


def test_finetune_epoch_benchmark_reports_loader_wait_and_shapes(capsys):
    bench_finetune_epoch.main(["--clips", "96", "--batch", "16", "--log-every", "2", "--settings",
                               "0/off,0/off/64,0/off/64/bucket/cudnn"])  # fmt: skip
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("0/off")}
    assert set(rows) == {"0/off", "0/off/64", "0/off/64/bucket/cudnn"}
    for row in rows.values():
        steps, epoch_s, step_ms, wait_ms, share = int(row[1]), float(row[2]), float(row[3]), float(row[4]), row[5]
        assert steps == 6 and epoch_s > 0 and 0 <= wait_ms < step_ms and share.endswith("%")
        samples_s, tflops = float(row[6]), float(row[7])
        gflop = float(out.split(" GFLOP per training sample")[0].rsplit("| ", 1)[1])
        assert tflops == pytest.approx(gflop * samples_s / 1e3, rel=0.02, abs=0.006)
        assert float(row[9]) > 0  # ms per batch of the loader alone
    # Shuffled batches: most of the 6 have their own longest clip; rounded up to 64 frames, fewer shapes.
    assert 1 <= int(rows["0/off/64"][8]) <= int(rows["0/off"][8]) <= 6


def test_finetune_epoch_settings_parse():
    setting = bench_finetune_epoch.Setting.parse("4/model/64")
    assert (setting.workers, setting.compile, setting.frames_multiple, setting.tokens_multiple) == (4, "model", 64, 8)
    assert bench_finetune_epoch.Setting.parse("0/off").frames_multiple == 1
    assert bench_finetune_epoch.Setting.parse("0/off").tokens_multiple == 1
    assert bench_finetune_epoch.Setting.parse("0/off/1/bucket").bucket and not setting.bucket
    assert setting.attention == "sdpa"
    cudnn = bench_finetune_epoch.Setting.parse("0/off/1/bucket/cudnn")
    assert cudnn.bucket and cudnn.attention == "sdpa_cudnn"
    assert not bench_finetune_epoch.Setting.parse("0/off/1/cudnn").bucket
    for bad in ("4", "4/fast", "4/off/0", "4/off/x", "4/off/64/8", "-1/off", "4/off/bucket", "4/off/64/bucket/1",
                "4/off/64/cudnn/bucket", "4/off/64/bucket/bucket"):
        with pytest.raises(SystemExit, match="expected WORKERS/COMPILE"):
            bench_finetune_epoch.Setting.parse(bad)


def test_finetune_epoch_shapes_are_counted_from_the_batches():
    def model(batch):
        return torch.zeros(2, 7)  # logits [B, 7]

    task = bench_finetune_epoch.Task(torch.nn.CrossEntropyLoss())
    for frames, tokens in ((128, 16), (192, 16), (128, 16), (128, 24)):
        task.training_step(model, {"mel": torch.zeros(2, 80, frames), "tokens": torch.zeros(2, tokens),
                                   "emotion": torch.zeros(2, dtype=torch.long)})
    assert task.shapes == {(128, 16), (192, 16), (128, 24)}


def test_kept_for_backward_counts_each_kept_storage_once():
    """Hand count, fp32, batch 5: both products keep their input x [5, 8] (one storage, counted
    once) and their weights (parameters, left out); ReLU keeps its output [5, 16]."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    params = [*first.parameters(), *second.parameters()]
    total, by_shape = bench_memory.kept_for_backward(lambda: torch.relu(first(x)) + second(x), params)
    assert total == 5 * 8 * 4 + 5 * 16 * 4
    assert by_shape == {("float32", (5, 8)): 160, ("float32", (5, 16)): 320}


def test_memory_benchmark_sees_pointwise_recomputation(capsys):
    variants = {name: bench_step.Variant.parse(name) for name in ("sdpa-fp32", "sdpa-bf16-compile", "sdpa-bf16-compile-pointwise")}
    rows = {name: bench_memory.measure(variant, "tiny", 2) for name, variant in variants.items()}
    per_sample = {name: row["per_sample"] for name, row in rows.items()}
    # bf16 halves what fp32 keeps and compiling keeps less again; pointwise recomputation less still.
    assert per_sample["sdpa-bf16-compile-pointwise"] < per_sample["sdpa-bf16-compile"] < per_sample["sdpa-fp32"] / 2
    row = rows["sdpa-fp32"]
    assert bench_memory.predicted_gib(row, 16) - bench_memory.predicted_gib(row, 8) == pytest.approx(8 * row["per_sample"] / 2**30)
    bench_memory.main(["--config", "tiny", "--variants", "sdpa-fp32", "--predict", "8,16", "--top", "2"])
    out = capsys.readouterr().out
    line = next(line for line in out[out.index("variant") :].splitlines() if line.startswith("sdpa-fp32"))
    assert float(line.split()[1]) == pytest.approx(row["per_sample"] / 2**20, abs=0.006)


def test_gpu_session_variants_all_parse():
    """A typo in gpu_checks.sh would only show on a lent GPU, after minutes of its budget."""
    import subprocess
    from pathlib import Path

    script = Path(bench_step.__file__).with_name("gpu_checks.sh")
    listed = subprocess.run(["bash", "-c", f'eval "$(sed -n "/^NEXT_VARIANTS=/,/\\"$/p;/^DEFAULT_PROFILE=/p" {script})"; '
                             'echo "$NEXT_VARIANTS"; echo "$DEFAULT_PROFILE"'],
                            capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    following, profiled = listed[0].split(","), listed[1].split(",")
    names = following + profiled + bench_step.DEFAULT_GPU_VARIANTS.split(",")
    assert len(names) > 10 and all(bench_step.Variant.parse(name).name == name for name in names)
    # bench_step profiles a variant only if it runs: a profiled name missing from the run is silently lost.
    assert profiled and set(profiled) <= set(following)


def test_run_parallel_keeps_to_its_job_count_and_reports_failures(tmp_path):
    import sys

    log = tmp_path / "log"
    work = ("import sys, time; open(sys.argv[1], 'a').write(f'start {time.time()}\\n'); time.sleep(1.0); "
            "open(sys.argv[1], 'a').write(f'end {time.time()}\\n')")
    commands = [[sys.executable, "-c", work, str(log)] for _ in range(4)]
    commands.insert(1, [sys.executable, "-c", "import sys; sys.exit('no such variant')"])
    assert bench_step.run_parallel(commands, 2) == [(1, "no such variant")]
    events = sorted((float(t), kind) for kind, t in (line.split() for line in log.read_text().splitlines()))
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert len(events) == 8 and peak == 2  # never more than 2 at once, and 2 did overlap


def test_prewarm_compiles_just_the_compiled_variants(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench_step, "run_parallel", lambda commands, jobs: seen.extend(commands) or [(0, "out of memory")])
    variants = [bench_step.Variant.parse(n) for n in ("sdpa-bf16", "sdpa-bf16-cudagraphs-b256", "sdpa-bf16-blocks-varlen")]
    args = type("Args", (), {"prewarm": 4, "device": "cuda", "config": "medium", "batch": 64})()
    bench_step.prewarm(variants, args)
    assert [c[c.index("--variants") + 1] for c in seen] == ["sdpa-bf16-cudagraphs-b256", "sdpa-bf16-blocks-varlen"]
    assert all("--compile-only" in c and c[c.index("--batch") + 1] == "64" for c in seen)
    out = capsys.readouterr().out
    assert "2 compiled variants in 2 processes" in out
    assert "prewarm of sdpa-bf16-cudagraphs-b256 failed, it compiles in the timed run: out of memory" in out


@pytest.mark.slow
def test_compile_only_with_prewarm_just_compiles_in_parallel(monkeypatch):
    """--compile-only --prewarm N (what gpu_checks runs beside the CUDA tests) hands every variant to
    the parallel prewarm and compiles nothing more in its own process; without --prewarm it compiles
    each variant itself."""
    prewarmed, compiled = [], []
    monkeypatch.setattr(bench_step, "prewarm", lambda variants, args: prewarmed.extend(v.name for v in variants))
    monkeypatch.setattr(bench_step, "compile_only", lambda variant, args, device: compiled.append(variant.name))
    names = "sdpa-fp32-compile,sdpa-fp32-blocks"
    bench_step.main(["--device", "cpu", "--variants", names, "--compile-only", "--prewarm", "2"])
    assert (prewarmed, compiled) == (names.split(","), [])
    bench_step.main(["--device", "cpu", "--variants", names, "--compile-only"])
    assert compiled == names.split(",")


def test_prewarm_fills_the_compile_cache_the_timed_run_reads(monkeypatch, tmp_path, capsys):
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # the prewarm processes inherit it
    bench_step.main(["--config", "tiny", "--variants", "sdpa-fp32-compile", "--steps", "1", "--prewarm", "1"])
    out = capsys.readouterr().out
    assert "prewarm: 1 compiled variants in 1 processes" in out and "failed" not in out
    assert any(cache.rglob("*"))
    assert float(next(l for l in out.splitlines() if l.startswith("sdpa-fp32-compile")).split()[2]) > 0


def test_profile_kernels_are_summed_by_family_per_step():
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma": 800.0,
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>": 200.0,
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN": 1000.0,
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize": 600.0,
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": 100.0,
        "triton_poi_fused_gelu_mul_3": 300.0,
        "void at::native::elementwise_kernel<128, 2>": 40.0,
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)": 60.0,
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)": 40.0,
        "void cudnn::cnn::conv2d_grouped_direct_kernel<float>": 20.0,
    }
    lines = bench_step.category_table(names, steps=2, wall_ms=2.0).splitlines()
    per_step = {line[:18].strip(): float(line[18:].split()[0]) for line in lines}
    assert per_step["attention"] == pytest.approx(0.55)  # 1,100 us over 2 steps, cuDNN's helpers included
    assert per_step["matmul"] == pytest.approx(0.8)
    assert per_step["optimizer"] == pytest.approx(0.05)
    assert per_step["fused (inductor)"] == pytest.approx(0.15)
    assert per_step["other"] == pytest.approx(0.02)
    assert per_step["convolution"] == pytest.approx(0.01)
    assert per_step["all kernels"] == pytest.approx(1.58)
    assert "GPU idle 0.42 ms" in lines[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_graph_trains_as_the_plain_compiled_step_on_cuda(tmp_path):
    """bench_step's stepgraph (one hand-captured CUDA graph per training step) gives the plain
    compiled step's losses and weights.  Its first call warms up three times on its first batch
    before replaying it, so the plain run trains on that batch four times too.  No token dropout or
    dropout: random draws would differ between the two runs."""
    path = deterministic_tiny(tmp_path)
    cuda = torch.device("cuda")
    batches = bench_step.make_batches(4, "fixed", cuda, count=3, seed=1)
    results = {}
    for name, inputs in (("sdpa-fp32-compile", [batches[0]] * 3 + batches * 2), ("sdpa-fp32-stepgraph", batches * 2)):
        torch._dynamo.reset()
        model, step = bench_step.build(bench_step.Variant.parse(name), path, cuda)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        losses = [float(step(*b)) for b in inputs]
        results[name] = (losses[-6:], torch.cat([p.detach().flatten() for p in model.parameters()]) - start)
    (plain_losses, plain_update), (graph_losses, graph_update) = results.values()
    assert graph_losses == pytest.approx(plain_losses, rel=1e-4)
    # Weights compared through what nine AdamW steps changed: Adam divides each gradient by its
    # running scale, so an element with a near-zero gradient can move by a visibly different amount
    # on rounding alone (one of 96 did, by 6e-4 of itself, on an H200), while a wrong step (a
    # gradient added to the last one, an update skipped) changes the whole update.
    assert (graph_update - plain_update).norm() <= 1e-2 * plain_update.norm()


def test_issue_9_targets_are_judged_on_the_best_qualifying_rows():
    def row(name, samples_s, tflops=0.0, peak_gib=0.0, batch=64):
        return {"name": name, "batch": batch, "samples_s": samples_s, "tflops": tflops, "peak_gib": peak_gib}

    rows = [
        row("sdpa-bf16", 1500.0, tflops=312.6),
        row("sdpa-bf16-compile", 1950.0, tflops=406.4),  # 1950 x 208.4 GFLOP = 406.4 TFLOP/s: 41.1% MFU
        row("sdpa-bf16-compile-varlen", 2500.0, tflops=521.0),  # MELD lengths: not the target's workload
        {"name": "sdpa-bf16-cudagraphs", "batch": 64, "note": "failed: RuntimeError: x"},
        row("sdpa-bf16-b256", 1900.0, peak_gib=31.0, batch=256),  # 33.3 GB
        row("sdpa-bf16-ckpt-b256", 1200.0, peak_gib=12.0, batch=256),  # checkpointing: not the target
        row("sdpa-bf16-bf16res-b256", 2000.0, peak_gib=29.5, batch=256),  # 31.7 GB
        row("sdpa-bf16-infer-b512", 6100.0, batch=512),
    ]
    ceiling = {"bf16": 798.0}  # TFLOP/s of the bench's bf16 matmul: 406.4 / 798 = 50.9%
    lines = bench_step.target_lines(rows, ceiling, peak=989.4)
    assert lines == [
        "training, batch 64: 1,950.0 samples/s, 50.9% of the ceiling, MFU 41.1% (sdpa-bf16-compile) against >= 1,900: met",
        "training, batch 256 without checkpointing: peak 29.50 GiB (31.7 GB, sdpa-bf16-bf16res-b256) against <= 32 GB: met",
        "inference: 6,100.0 samples/s (sdpa-bf16-infer-b512) against >= 6,000: met",
    ]
    assert bench_step.target_lines(rows[:1], ceiling, peak=None) == [
        "training, batch 64: 1,500.0 samples/s, 39.2% of the ceiling, MFU n/a (sdpa-bf16) against >= 1,900: not met",
        "training, batch 256 without checkpointing: no row ran",
        "inference: no row ran",
    ]


@pytest.mark.parametrize("main", [bench_step.main, bench_finetune_epoch.main])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "gpu"])
def test_a_device_this_machine_lacks_is_one_line_not_a_traceback(main, device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if device == "cuda:1" else 0)
    with pytest.raises(SystemExit) as refused:
        main(["--device", device, "--config", "tiny"])
    message = str(refused.value.code)
    assert message.startswith(f"--device {device}: ") and "\n" not in message


@pytest.mark.parametrize("main, argv", [
    (bench_step.main, ["--steps", "0"]),  # was taken for "not given": the default count, silently
    (bench_step.main, ["--steps", "-1"]),  # timed nothing and printed negative samples/s
    (bench_step.main, ["--batch", "0"]),
    (bench_step.main, ["--warmup", "-1"]),
    (bench_step.main, ["--peak-tflops", "0"]),
    (bench_memory.main, ["--batch", "0"]),  # a traceback from inside the model
    (bench_memory.main, ["--predict", "8,x"]),  # a ValueError traceback
    (bench_finetune_epoch.main, ["--clips", "0"]),
    (bench_finetune_epoch.main, ["--batch", "-4"]),
    (bench_prepare.main, ["--repeat", "0"]),  # timed nothing: a table of inf seconds and 0 clips/s
    (bench_prepare.main, ["--workers", "0"]),  # a traceback, after minutes of the one-process methods
])
def test_numeric_arguments_out_of_range_are_one_error_line(main, argv, capsys):
    with pytest.raises(SystemExit) as refused:
        main(argv if main is bench_prepare.main else ["--config", "tiny", *argv])
    assert refused.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # argparse's usage lines, then this one
    assert re.fullmatch(rf".*: error: argument {argv[0]}: (must be|expected) .+", error), error


@pytest.mark.parametrize("main", [bench_step.main, bench_memory.main, bench_finetune_epoch.main])
def test_a_model_config_that_does_not_load_is_one_error_line(main, capsys):
    """bench_step printed a table of rows all failing on it, exit 0; the others a traceback, the fine-tune
    bench only after writing its feature store."""
    with pytest.raises(SystemExit) as refused:
        main(["--config", "no-such-preset", "--device", "cpu"] if main is not bench_memory.main else ["--config", "no-such-preset"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --config: no-such-preset: not a model preset (tiny, small, medium, large) and no such YAML file")


@pytest.mark.parametrize("main, argv, message", [
    # Profiled only if it runs: the name was silently never profiled.
    (bench_step.main, ["--variants", "sdpa-fp32", "--profile", "sdpa-bf16"], "--profile sdpa-bf16: not among the variants run"),
    # On the CPU the run stopped at this row, the rows before it timed and the table never printed.
    (bench_step.main, ["--variants", "sdpa-fp32,sdpa-fp32-stepgraph"], "variant 'sdpa-fp32-stepgraph': stepgraph captures a CUDA graph"),
    (bench_memory.main, ["--variants", "sdpa-fp32,sdpa-fp32-stepgraph"], "variant 'sdpa-fp32-stepgraph': stepgraph needs a CUDA device"),
])
def test_a_run_that_would_lose_rows_is_refused_before_timing_anything(main, argv, message, capsys):
    device = ["--device", "cpu"] if main is bench_step.main else []
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--config", "tiny", *device, *argv])
    assert capsys.readouterr().out == ""  # nothing measured first


def test_an_indexed_cuda_device_becomes_the_current_one(monkeypatch):
    """bench_step synchronises, reads peak memory and names the device through calls that take the
    current CUDA device: on --device cuda:1 they addressed device 0, timing unsynchronised steps."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert bench_arguments.device_arg("cuda:1") == torch.device("cuda:1") and chosen == [1]
    bench_arguments.device_arg("cuda")  # the current device, whichever it is: left alone
    bench_arguments.device_arg("cpu")
    assert chosen == [1]


def deterministic_tiny(tmp_path) -> str:
    """CLARA tiny with no token dropout or dropout, as a YAML path for bench_step's --config: random
    draws differ between kernels (fused attention dropout) and runs, so only this config can match."""
    import yaml

    from clara.model_config import preset_path

    config = yaml.safe_load(preset_path("tiny").read_text())
    config["audio"]["token_keep"], config["text"]["dropout"] = 1.0, 0.0
    path = tmp_path / "tiny-deterministic.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def embeddings_and_gradients(model, inputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(audio embeds, text embeds, {name: gradient}) of the bench's loss on one batch."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    ContrastiveLoss()(out.audio_embeds, out.text_embeds, out.audio_scale, out.text_scale).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.audio_embeds.detach(), out.text_embeds.detach(), grads


# gpu_checks' compiled combinations as bench_step builds them, in fp32 (bf16's own error is
# test_precision's): cudagraphs, cdt and the Triton kernels need CUDA to differ from the plain path, so
# on the CPU these check the rest (split Q/K/V, recompute levels, the GEGLU op inside a compiled
# graph, dynamic sizes for variable lengths, per-block compilation, selective recomputation).
BUILT_VARIANTS = [
    "sdpa_cudnn-fp32-cudagraphs-qkvsplit-cdt-tritongeglu", "sdpa_cudnn-fp32-cudagraphs-qkvsplit-pointwise-cdt",
    "sdpa_cudnn-fp32-compile-aggressive-sac", "sdpa_cudnn-fp32-cudagraphs-qkvsplit-bucket-cdt",
    "sdpa-fp32-blocks-varlen-ckpt",
]  # fmt: skip


@pytest.mark.parametrize("name", BUILT_VARIANTS)
def test_built_variants_match_the_eager_fp32_reference(name, tmp_path):
    """bench_step.build's model for each variant (its overrides, compilation with the variant's
    recompute level and tuning, through inductor's decompositions and partitioner without generated
    kernels) against ``eager-fp32``'s from the same weights: embeddings and every gradient of the
    bench's loss within rtol 1e-5 / atol 1e-6, on two of the variant's batches (masks on)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from clara.compilation import set_recompute, set_tuning

    config, cpu, variant = deterministic_tiny(tmp_path), torch.device("cpu"), bench_step.Variant.parse(name)
    reference, _ = bench_step.build(bench_step.Variant.parse("eager-fp32"), config, cpu)
    torch._dynamo.reset()
    try:
        model, _ = bench_step.build(variant, config, cpu, backend="aot_eager_decomp_partition")
        built = model.config
        assert (built.attention, built.activation_checkpointing, built.selective_recompute, built.audio.latent_qkv,
                built.audio.geglu_kernel) == (variant.attention, variant.ckpt, variant.sac,
                                              "split" if variant.qkvsplit else "fused",
                                              "triton" if variant.tritongeglu else "pytorch")  # fmt: skip
        assert functorch_config.ban_recompute_materialized_backward == (variant.recompute == "default")
        assert functorch_config.aggressive_recomputation == (variant.recompute == "aggressive")
        assert inductor_config.coordinate_descent_tuning == variant.cdt
        model.load_state_dict(reference.state_dict())
        for inputs in bench_step.make_batches(3, variant.lengths, cpu, count=2, seed=1):
            want, got = embeddings_and_gradients(reference, inputs), embeddings_and_gradients(model, inputs)
            torch.testing.assert_close(got[:2], want[:2], rtol=1e-5, atol=1e-6)
            assert got[2].keys() == want[2].keys()  # the loss reads every parameter, temperatures included
            for key, grad in want[2].items():
                torch.testing.assert_close(got[2][key], grad, rtol=1e-5, atol=1e-6, msg=key)
    finally:
        set_recompute("default")
        set_tuning(False)
        torch._dynamo.reset()


def test_gpu_checks_refuse_at_once_without_a_gpu(tmp_path):
    import subprocess
    from pathlib import Path

    # nvidia-smi as it answers on a machine with no driver (or none at all: "command not found").
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"
                    "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n")
    fake.chmod(0o755)
    script = Path(bench_step.__file__).with_name("gpu_checks.sh")
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PARTS": "tests step"}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("gpu_checks.sh: no NVIDIA GPU here (nvidia-smi: NVIDIA-SMI has failed because it could not "
                           "communicate with the NVIDIA driver.); run it on a GPU machine\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["nvidia-smi.txt"]  # nothing else ran


@pytest.mark.parametrize("argument, profiled", [(None, "default"), ("all", "default"), ("eager-fp32", "")])
def test_gpu_checks_profile_only_variants_they_run_and_exit_1_when_a_part_fails(tmp_path, argument, profiled):
    """Variants given as an argument ran with the default --profile names, which bench_step refuses when
    they are not run; and a failed part still ended the script with status 0."""
    import subprocess
    from pathlib import Path

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total'\n")
    # python3 records its arguments, one call per line, and fails the timed bench_step run.
    (bin_dir / "python3").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "calls"}\n'
                                     '[[ "$*" == *--compile-only* ]] || exit 3\n')
    for fake in bin_dir.iterdir():
        fake.chmod(0o755)
    script = Path(bench_step.__file__).with_name("gpu_checks.sh")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PARTS": "step"}
    done = subprocess.run(["bash", str(script), *([argument] if argument else [])], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    prewarm, timed = (tmp_path / "calls").read_text().splitlines()
    assert "--compile-only" in prewarm
    default = subprocess.run(["bash", "-c", f'eval "$(grep ^DEFAULT_PROFILE= {script})"; echo "$DEFAULT_PROFILE"'],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert re.search(r"--profile (\S*) --profile-rows", timed)[1] == (default if profiled else "")
    assert ("--variants eager-fp32" in timed) == (argument == "eager-fp32")
