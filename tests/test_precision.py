"""`train.precision=auto` on CPU: bf16 where the CPU computes it natively, fp32 elsewhere (issue 26), said in
the start line, metrics.json and the model card; and a bf16 run on CPU resumes bit-exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
    """bf16 autocast is not bit-exact against fp32, but against itself it is: a kill after step 13
    (checkpoints every 4 steps) resumes at step 12 and ends equal to the uninterrupted bf16 run."""
    opts = [*TINY, f"data.dir={tiny_betons}", "train.epochs=2", "train.precision=bf16", "train.checkpoint_every=4",
            "optim.lookahead_every=3", "data.flip_alternate=true"]
    codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / 'ref'}"], tmp_path / "ref.log", 1)
    assert codes == [0], (tmp_path / "ref.log").read_text()
    run_dir = tmp_path / "run"
    codes = launch("dist_resnet.train", [*opts, f"run.dir={run_dir}"], tmp_path / "kill.log", 1,
                   {"DIST_RESNET_FAULT": "step:13"})
    assert codes == [-9] and load(run_dir / "last.pt")["step"] == 12, (tmp_path / "kill.log").read_text()
    codes = launch("dist_resnet.train", [*opts, f"run.dir={run_dir}", "train.resume=true"], tmp_path / "res.log", 1)
    assert codes == [0], (tmp_path / "res.log").read_text()
    assert (metrics(run_dir)["precision"], metrics(run_dir)["precision_why"]) == ("bf16", "as set")
    assert_same_run(tmp_path / "ref", run_dir)
