"""The teacher runtime: adapter mode equals merged mode in less memory, the side-stream schedule (teacher(x_{j+1})
submitted before backward(j)) gives the serial result, phases and the profiler window."""

import logging

import pytest
import torch
from conftest import GradientCapture, needs_cpu_rowwise

from opd_fast.config import ConfigError, ModelConfig
from opd_fast.families import get_family
from opd_fast.models import Conditioning, load_transformer
from opd_fast.profiling import PHASES, CaptureWindow, PhaseTimer, parse_window
from opd_fast.teachers import Teacher, TeacherRunner, load_teachers, teacher_memory_bytes

SD3 = get_family("sd3")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def conditioning(batch=2):
    g = torch.Generator().manual_seed(0)
    return Conditioning(
        torch.randn(batch, 16, 32, generator=g),
        torch.randn(batch, 32, generator=g),
        torch.randn(1, 16, 32, generator=g),
        torch.randn(1, 32, generator=g),
    )


def test_adapter_mode_matches_merged_mode_in_less_memory(tiny_config):
    # All three layouts of configs/tiny: peft and diffusers LoRAs become adapters of one shared base; the full-model
    # teacher keeps its own copy. Unmerged LoRA vs merged weights: equal up to float32 rounding.
    cfg = tiny_config()
    base = load_transformer(cfg.model, SD3)
    merged = load_teachers(cfg.tasks, base, SD3, cfg.teacher_runtime)
    cfg.teacher_runtime.mode = "adapter"
    adapter = load_teachers(cfg.tasks, base, SD3, cfg.teacher_runtime)
    assert adapter["geneval"].model is adapter["ocr"].model and adapter["aesthetic"].adapter is None
    assert not any(p.requires_grad for p in adapter["ocr"].model.parameters())
    x, sigma, cond = torch.randn(2, 4, 8, 8), torch.tensor([0.8, 0.4]), conditioning()
    for name in merged:  # in an order that switches adapters back and forth
        v_merged, g_merged = merged[name].velocity(SD3, x, sigma, cond)
        v_adapter, g_adapter = adapter[name].velocity(SD3, x, sigma, cond)
        assert g_merged == g_adapter
        torch.testing.assert_close(v_adapter, v_merged, rtol=1e-5, atol=1e-6)
    assert teacher_memory_bytes(adapter) < teacher_memory_bytes(merged)


def test_merged_teachers_share_the_base_buffers_and_casts_do_not_leak(tiny_config):
    # Only the LoRA teachers are copies of the base; the full-model teacher (aesthetic) was loaded on its own.
    cfg = tiny_config()
    base = load_transformer(cfg.model, SD3)
    table = base.pos_embed.pos_embed
    saved = table.clone()
    teachers = load_teachers(cfg.tasks, base, SD3, cfg.teacher_runtime)
    copies = [teachers["geneval"].model, teachers["ocr"].model]
    assert all(m.pos_embed.pos_embed is table for m in copies)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(copies[0].parameters(), base.parameters()))
    params = sum(p.nbytes for p in base.parameters())
    buffers = sum(b.nbytes for b in base.buffers())
    full = teachers["aesthetic"].model
    own = sum(t.nbytes for t in list(full.parameters()) + list(full.buffers()))
    assert teacher_memory_bytes(teachers) == 2 * params + buffers + own  # the table counted once
    cfg.teacher_runtime.precision = "bf16"
    cast = load_teachers(cfg.tasks[:1], base, SD3, cfg.teacher_runtime)["geneval"].model
    assert cast.pos_embed.pos_embed.dtype == torch.bfloat16
    assert table.dtype == torch.float32 and torch.equal(table, saved)


@needs_cpu_rowwise
def test_adapter_mode_in_fp8_keeps_the_lora_factors_high(tiny_config):
    cfg = tiny_config(**{"teacher_runtime.mode": "adapter", "teacher_runtime.precision": "fp8"})
    teachers = load_teachers(cfg.tasks, load_transformer(cfg.model, SD3), SD3, cfg.teacher_runtime)
    shared = teachers["ocr"].model
    lora_a = [m for n, m in shared.named_modules() if n.endswith("lora_A.ocr")]
    assert lora_a and all(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32 for m in lora_a)
    v, _ = teachers["ocr"].velocity(SD3, torch.randn(2, 4, 8, 8), torch.tensor([0.8, 0.4]), conditioning())
    assert torch.isfinite(v).all()


def test_side_stream_on_cpu_runs_the_serial_schedule(tiny_trainer):
    side = tiny_trainer(**{"teacher_runtime.stream": "side", "sampling.num_steps": 3})
    serial = tiny_trainer(**{"teacher_runtime.stream": "serial", "sampling.num_steps": 3})
    assert not side.teacher_runner.side and side.teacher_runner.stream is None
    side.train_round()
    serial.train_round()
    for (name, a), (_, b) in zip(side.student.named_parameters(), serial.student.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same ops in the same order: bitwise


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
def test_teacher_of_the_next_state_is_submitted_before_the_backward(tiny_trainer, schedule):
    # The overlap the side stream exploits: submit(j+1) comes after opd_step(j) and before backward(j), and its
    # result is taken after the student's forward at j+1; no submit for the untrained last state.
    trainer = tiny_trainer(**{"train.schedule": schedule, "sampling.num_steps": 3})
    events = []
    runner, engine = trainer.teacher_runner, trainer.engine
    submit, result, backward = runner.submit, runner.result, engine.backward
    runner.submit = lambda *a: events.append("submit") or submit(*a)
    runner.result = lambda h: events.append("result") or result(h)
    engine.backward = lambda loss: events.append("backward") or backward(loss)
    trainer.train_round()
    expected = []
    for steps in trainer.num_trained.values():  # one micro-batch per task
        expected += ["submit"] + ["result", "submit", "backward"] * (steps - 1) + ["result", "backward"]
    assert events == expected


def test_phase_timer_covers_every_phase(tiny_trainer):
    trainer = tiny_trainer(timer=PhaseTimer("cpu"), **{"train.schedule": "two_pass", "sampling.num_steps": 3})
    trainer.train_round()
    seconds = trainer.phase_timer.read()
    assert set(PHASES) <= set(seconds) and all(seconds[p] > 0 for p in PHASES)
    assert {"rollout/student_forward", "rollout/loss"} <= set(seconds)
    assert trainer.phase_timer.read() == {}


def test_capture_window_is_a_logged_no_op_on_cpu(tiny_trainer, caplog):
    assert parse_window("2:4") == (2, 4)
    for bad in ("4:2", "a:b", "3"):
        with pytest.raises(ValueError, match="--profile-steps"):
            parse_window(bad)
    window = CaptureWindow(0, 2)
    trainer = tiny_trainer(hooks=[window], **{"sampling.num_steps": 2, "train.rounds": 3})
    with caplog.at_level(logging.INFO, logger="opd_fast.profiling"):
        trainer.fit()
    assert caplog.text.count("no-op") == 1  # said once, for the window's first round
    assert not window.active


def test_delayed_scaling_is_refused_by_name(tiny_config):
    # TE's DelayedScaling would cache a frozen teacher's weights quantized with its initial scale 1 (opd_fast.fp8)
    with pytest.raises(ConfigError, match="teacher_runtime.fp8_scaling"):
        tiny_config(**{"teacher_runtime.fp8_backend": "te", "teacher_runtime.fp8_scaling": "delayed"})


@needs_cuda
@pytest.mark.parametrize("precision", ["model", "fp8"])
def test_side_stream_gives_the_serial_result_on_cuda(tiny_trainer, precision):
    # Same kernels on another stream, ordered by events: the round's gradient equals the serial run's (tolerance
    # for cuBLAS picking other algorithms under concurrency).
    grads = []
    for stream in ("side", "serial"):
        capture = GradientCapture()
        trainer = tiny_trainer(
            device="cuda", hooks=[capture], **{"teacher_runtime.stream": stream, "teacher_runtime.precision": precision}
        )
        assert trainer.teacher_runner.side == (stream == "side")
        trainer.train_round(step=False)
        grads.append(capture.flat())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@needs_cuda
def test_pipelined_micro_batch_does_not_synchronise_the_host(tiny_trainer):
    trainer = tiny_trainer(device="cuda")
    lane = trainer._lane(0, 0, trainer.batch_indices(0, 0), (2, 4, 8, 8), 0.5)
    trainer._sigma_rows(2)  # made once per batch size, before the loop
    trainer._coefficients(2, 4 * 8 * 8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer._train_lanes([lane])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_runner_keeps_cross_stream_tensors_alive():
    # The caller frees its input right after submit and at once allocates and writes a tensor of the same size,
    # while the side stream is still busy: record_stream must keep the input's memory until the side stream has
    # read it, or the teacher would read NaN.
    teacher = Teacher("t", load_transformer(ModelConfig(), SD3).cuda(), 4.5)
    runner = TeacherRunner(SD3, "cuda", "side")
    cond = Conditioning(*(t.cuda() for t in vars(conditioning()).values()))
    x = torch.randn(2, 4, 8, 8, device="cuda")
    sigma = torch.tensor([0.8, 0.4], device="cuda")
    expected, _ = teacher.velocity(SD3, x, sigma, cond)
    with torch.cuda.stream(runner.stream):
        torch.cuda._sleep(50_000_000)  # the side stream reaches the teacher forward late
    handle = runner.submit(teacher, x.clone(), sigma, cond)  # the clone's last reference dies here
    junk = torch.full((2, 4, 8, 8), float("nan"), device="cuda")
    v, _ = runner.result(handle)
    torch.testing.assert_close(v, expected)
    del junk


def test_cuda_graphs_on_cpu_run_the_teachers_eagerly(tiny_trainer, caplog):
    with caplog.at_level(logging.INFO, logger="opd_fast.teachers"):
        graphed = tiny_trainer(**{"teacher_runtime.cuda_graphs": True, "sampling.num_steps": 3})
    assert graphed.teacher_runner.graphs is None and "run eagerly" in caplog.text
    plain = tiny_trainer(**{"sampling.num_steps": 3})
    graphed.train_round()
    plain.train_round()
    for a, b in zip(graphed.engine.params, plain.engine.params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("stream", ["side", "serial"])
def test_cuda_graph_teachers_give_the_eager_gradient(tiny_trainer, stream):
    # The replayed graph runs the eager forward's kernels on copies of the inputs; its output is cloned, because the
    # backward of step j still reads the teacher velocity of step j after the teacher of step j + 1 was submitted
    # (a replay would overwrite it): both schedules would differ from eager without the clone.
    grads = []
    for graphs in (True, False):
        capture = GradientCapture()
        trainer = tiny_trainer(
            device="cuda", hooks=[capture], **{"teacher_runtime.cuda_graphs": graphs, "teacher_runtime.stream": stream}
        )
        trainer.train_round(step=False)
        trainer.train_round(step=False)  # the second round replays the graphs captured in the first
        grads.append(capture.flat())
        if graphs:
            assert len(trainer.teacher_runner.graphs) == 1  # one task, one input signature
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@needs_cuda
@pytest.mark.parametrize("placement", ["device", "host"])
def test_prompt_placement_copies_without_a_host_wait(tiny_trainer, placement):
    trainer = tiny_trainer(device="cuda", **{"prompts.placement": placement})
    cache = trainer.prompts[trainer.cfg.tasks[0].name]
    assert cache.embeds.device.type == ("cuda" if placement == "device" else "cpu")
    index = trainer.batch_indices(0, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cond = cache.conditioning(index, trainer.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(cond.prompt_embeds.cpu(), cache.embeds[index.to(cache.embeds.device)].cpu().float())
