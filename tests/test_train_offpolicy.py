"""One CPU step of the off-policy presets (REC, OPMD, AsymRE, CISPO) on the real SmolLM2-135M-Instruct."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfuse.engine.cli import main
from test_train_e2e import TINY, noisy_rewards, read_metrics  # noqa: F401  (noisy_rewards is a fixture)


@pytest.mark.parametrize("algo", ["rec", "opmd", "asymre", "cispo"])
def test_offpolicy_preset_trains_one_step(algo, smollm2_dir, tmp_path, noisy_rewards, device):  # noqa: F811
    out = tmp_path / algo
    args = ["train", "--algo", algo, "--model", smollm2_dir, *TINY, "--output-dir", str(out), "--steps", "1",
            "--device", device.type]
    assert main(args) == 0
    (record,) = read_metrics(out)
    assert record["step"] == 1
    for key in ("loss", "grad_norm", "entropy", "clip_frac", "reward_mean"):
        assert math.isfinite(record[key]), (key, record[key])
    assert record["grad_norm"] > 0
    trained = load_file(out / "checkpoint" / "model.safetensors")
    initial = load_file(Path(smollm2_dir) / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k].to(trained[k].dtype)) for k in initial)
