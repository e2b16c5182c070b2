"""`python -m dist_resnet.bench compress` (dist_resnet/bench/compress.py, frontier.py) at tiny settings: the
frontier's full run is a benchmark (docs/BENCHMARKS.md, "Compression"), not a test."""
from __future__ import annotations

import pytest

from tests.conftest import TINY


def test_bench_compress_measures_every_variant_and_judges_the_goals(trained_run, tiny_betons, tmp_path):
    """bench compress at tiny settings, from the suite's trained run as the teacher (no teacher to train): the
    small model alone and distilled, the teacher pruned and fine-tuned with it distilling; each variant's fp32 and
    int8 graphs scored and timed; the table, the goals and the plot. A second call reuses every run."""
    from dist_resnet.bench import compress

    argv = ["--data", str(tiny_betons), "--out", str(tmp_path / "c"), "--teacher", str(trained_run / "last.pt"),
            "--width", "8", "--epochs", "1", "--ratios", "0.5", "--finetune-epochs", "1", "--seeds", "1",
            "--speed-seconds", "0.02", "--calibration", "64", *TINY[2:]]
    result = compress.main(argv)
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "small", "small+kd", "pruned-0.5"] and not result["skipped"]
    for r in rows.values():
        assert r["fp32_img_per_s_b64"] > 0 and r["int8_img_per_s_b1"] > 0 and 0 < r["top1"]["int8"] <= 1
        assert all(c.startswith("python -m dist_resnet.") for c in r["commands"])
        assert r["commands"] or r["variant"] == "teacher"  # a given teacher has no command here
    # the pruned teacher (width 16 at 0.5, rounded to 8) has the small model's very shape: the same FLOPs
    assert rows["pruned-0.5"]["flops"] == rows["small"]["flops"]
    assert rows["small"]["flops_share"] == pytest.approx(0.25, abs=0.01)  # the stem's 3 inputs and the 10 classes stay
    assert rows["teacher"]["top1"]["fp32"] == pytest.approx(rows["teacher"]["top1"]["pytorch"], abs=0.01)
    assert len(result["goals"]) == 4 and all(g["measured"] for g in result["goals"])
    text = (tmp_path / "c" / "frontier.md").read_text()
    assert "| pruned-0.5 |" in text and "Goals:" in text and "python -m dist_resnet.prune" in text
    assert (tmp_path / "c" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    again = compress.main(argv)  # every run and graph reused: only the speeds are measured again
    assert [r.get("acc_mean") for r in again["rows"]] == [r.get("acc_mean") for r in result["rows"]]
