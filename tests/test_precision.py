"""`train.precision=auto` on CPU: bf16 where the CPU computes it natively, fp32 elsewhere (issue 26), said in
the start line, metrics.json and the model card; and a bf16 run on CPU resumes bit-exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dist_resnet.checkpoint import load
from tests.conftest import TINY, python_module, run
from tests.launch import launch
from tests.runs import assert_same_run, metrics


def cpu_flags() -> set[str]:
    """The CPU's flags as the kernel lists them: read independently of torch's own test."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


NATIVE = bool({"avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
# what torch and oneDNN do on an AVX2-only CPU (the emulation of the slower path on this machine)
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
RESOLVE = ("import json, torch; from dist_resnet.config import Precision; from dist_resnet.precision import Amp; "
           "a = Amp.on(Precision.auto, torch.device('cpu')); print(json.dumps([a.precision.value, a.why]))")


def resolved(env: dict | None = None) -> tuple[str, str]:
    """auto on CPU, in a fresh process (torch reads ATEN_CPU_CAPABILITY once, at import)."""
    return tuple(json.loads(run([sys.executable, "-c", RESOLVE], env=env).stdout))


def test_auto_is_bf16_where_the_cpu_computes_it_and_fp32_under_the_avx2_emulation():
    precision, why = resolved()
    if NATIVE:
        assert precision == "bf16" and why.startswith("auto: the CPU has ") and "AVX512" in why, why
    else:
        assert precision == "fp32" and why == "auto: the CPU has neither AMX nor AVX512-BF16", why
    precision, why = resolved(AVX2)
    assert precision == "fp32", why
    if NATIVE:  # the flags are there, the kernels are not: the reason names what lowered them
        assert why == "auto: torch's CPU kernels run at AVX2 (ATEN_CPU_CAPABILITY), below AVX512", why
        precision, why = resolved({"ONEDNN_MAX_CPU_ISA": "AVX2"})
        assert (precision, why) == ("fp32", "auto: ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN no bf16 convolutions")


def test_a_run_says_what_auto_chose_and_why_and_its_card_says_it_too(tiny_betons, tmp_path):
    run_dir = tmp_path / "run"
    out = python_module("dist_resnet.train", *TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}",
                        "train.epochs=1", "train.precision=auto").stdout
    precision, why = resolved()
    assert f"x1 ({precision} ({why})), global batch" in out, out
    m = metrics(run_dir)
    assert (m["precision"], m["precision_why"]) == (precision, why)
    python_module("dist_resnet.export", str(run_dir / "last.pt"), "--format", "safetensors",
                  "--out", str(tmp_path / "m.safetensors"))
    card = (tmp_path / "m.safetensors.md").read_text()
    assert f"precision {precision} ({why}); training time" in card, card


def test_a_bf16_run_on_cpu_resumes_bit_exactly(tiny_betons, tmp_path):
    """bf16 autocast is not bit-exact against fp32, but against itself it is: a kill after step 7
    (checkpoints every 4 steps) resumes at step 4 and ends equal to the uninterrupted bf16 run. One epoch at
    width 4: a CPU without native bf16 emulates it (2 epochs at width 8 took 69 s of the suite on an AVX2 EPYC,
    this 20 s)."""
    opts = [*TINY, f"data.dir={tiny_betons}", "train.epochs=1", "train.precision=bf16", "train.checkpoint_every=4",
            "optim.lookahead_every=3", "data.flip_alternate=true", "model.width=4"]
    codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / 'ref'}"], tmp_path / "ref.log", 1)
    assert codes == [0], (tmp_path / "ref.log").read_text()
    run_dir = tmp_path / "run"
    codes = launch("dist_resnet.train", [*opts, f"run.dir={run_dir}"], tmp_path / "kill.log", 1,
                   {"DIST_RESNET_FAULT": "step:7"})
    assert codes == [-9] and load(run_dir / "last.pt")["step"] == 4, (tmp_path / "kill.log").read_text()
    codes = launch("dist_resnet.train", [*opts, f"run.dir={run_dir}", "train.resume=true"], tmp_path / "res.log", 1)
    assert codes == [0], (tmp_path / "res.log").read_text()
    assert (metrics(run_dir)["precision"], metrics(run_dir)["precision_why"]) == ("bf16", "as set")
    assert_same_run(tmp_path / "ref", run_dir)


def test_auto_resumed_where_it_resolves_otherwise_says_so_and_records_each_part(tiny_betons, tmp_path, monkeypatch,
                                                                                capsys):
    """A run started in bf16 (`auto` on a CPU with AVX512-BF16) and resumed where `auto` gives fp32 (another
    machine, or ATEN_CPU_CAPABILITY=avx2) went on in fp32 in silence, and metrics.json and the card said fp32 for
    a run that was partly bf16. The checkpoint records what each stretch of steps ran in; the resume says the
    change in one line; metrics.json and the card give both parts. The CPU's answer is stood in for here, as
    each machine gives only one. The resume also switches run.pictures on, which it may."""
    from dist_resnet import export, precision, train

    def cpu(native: bool):
        why = ("the CPU has AVX512-BF16 and torch's kernels run at AVX512" if native
               else "the CPU has neither AMX nor AVX512-BF16")
        monkeypatch.setattr(precision, "cpu_bf16_support", lambda: {"native": native, "why": why})

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # the run stops at its first check, after step 2, with a checkpoint
    argv = [*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", "train.epochs=1", "train.precision=auto",
            "train.stop_check_every=2", "model.width=4"]
    cpu(native=True)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 75 and load(run_dir / "last.pt")["precision"][0]["precision"] == "bf16"
    cpu(native=False)
    capsys.readouterr()
    train.main([*argv, "train.resume=true", "run.pictures=true"])
    out = capsys.readouterr().out
    assert "note: this run trained in bf16 (auto: the CPU has AVX512-BF16 and torch's kernels run at AVX512) until " \
           "step 2; it goes on in fp32 (auto: the CPU has neither AMX nor AVX512-BF16): the run continues, but no " \
           "longer bit-identical" in out, out
    m = metrics(run_dir)
    assert [(s["from_step"], s["precision"]) for s in m["precision_segments"]] == [(0, "bf16"), (2, "fp32")]
    assert m["completed"] and (run_dir / "curves.png").exists()  # run.pictures, switched on at the resume
    export.main([str(run_dir / "last.pt"), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")])
    card = (tmp_path / "m.safetensors.md").read_text()
    assert "precision bf16 (auto: the CPU has AVX512-BF16 and torch's kernels run at AVX512) for steps 1-2, then " \
           "fp32 (auto: the CPU has neither AMX nor AVX512-BF16) from step 3;" in card, card


def test_a_loss_scale_resumed_from_a_run_that_had_none_starts_afresh():
    """A bf16 start resumed where only fp16 runs (a GPU without bf16) loaded the saved `{}` into a GradScaler,
    which raised "The source state dict is empty". The scale now starts afresh (GradScaler on the CPU here)."""
    import torch

    from dist_resnet.engine.step import DynamicLossScale, NoLossScale

    scale = DynamicLossScale(torch.device("cpu"))
    scale.load_state_dict(NoLossScale().state_dict())
    assert scale.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    saved = {"scaler": {**scale.scaler.state_dict(), "scale": 1024.0}}
    scale.load_state_dict(saved)
    assert scale.scaler.get_scale() == 1024.0
