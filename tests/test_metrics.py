"""The running mean drawn over the paid correctness in reward.png, against a direct mean of each window."""

import random

import pytest

from rlfuse.engine.metrics import MetricsLog, running_mean


@pytest.mark.parametrize("window", [1, 2, 5, 40])
def test_running_mean_matches_window_means(window):
    rng = random.Random()
    values = [rng.random() for _ in range(rng.randint(1, 30))]
    expected = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                for i in range(len(values))]
    assert running_mean(values, window) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_running_mean_rejects_empty_window():
    with pytest.raises(ValueError, match="window"):
        running_mean([0.5], 0)


def test_plot_draws_running_mean_past_window(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    log = MetricsLog(tmp_path)
    for step in range(1, 8):
        log.append({"step": step, "reward_mean": 0.1, "accuracy": 0.2, "derived_rate": step / 10})
    assert (tmp_path / "reward.png").is_file()
    assert "accuracy, answer derived (paid), 5-step mean" in labels  # drawn once 6 steps are logged
    assert labels.count("accuracy, answer derived (paid), 5-step mean") == 2  # steps 6 and 7
