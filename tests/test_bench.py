"""dist_resnet.bench on CPU at small sizes: it measures, prints a table and writes JSON."""
import json

import pytest

from dist_resnet import bench
from tests.conftest import TINY


def test_throughput_ablation_and_loader_report(tiny_betons, tmp_path, capsys):
    common = [*TINY, f"data.dir={tiny_betons}"]
    bench.main(["throughput", *common, "--ablate", "--breakdown", "--steps", "1", "--warmup", "1", "--repeats", "2",
                "--out", str(tmp_path / "t.json")])  # the CLI, in-process
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "t.json").read_text())
    rows, parts = result["rows"], result["breakdown"]
    assert [r["variant"] for r in rows] == ["full", "no AMP (fp32)", "no channels_last", "no torch.compile",
                                            "device-resident data", "no data (one fixed batch)"]
    assert all(r["img_per_s"] > 0 and r["repeats"] == 2 for r in rows)
    assert 0.035 < rows[0]["train_gflop_per_img"] < 0.04  # resnet9 width 8: 0.037 GFLOP fwd+bwd per image
    assert "| variant | img_per_s |" in out and "| component | ms_per_step |" in out
    fwd_bwd, optim, data, step, evaluation = parts
    assert step["ms_per_step"] > 0 and fwd_bwd["ms_per_step"] > 0 and 0 < evaluation["share_of_epoch"] < 1
    assert fwd_bwd["ms_per_step"] + optim["ms_per_step"] + data["ms_per_step"] == pytest.approx(step["ms_per_step"])
    bench.main(["loader", *common, "data.pipeline=device", "--epochs", "1", "--out", str(tmp_path / "l.json")])
    r = json.loads((tmp_path / "l.json").read_text())
    assert r["pipeline"] == "device" and r["img_per_s"] > 0 and "| pipeline |" in capsys.readouterr().out
