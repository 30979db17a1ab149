"""The reward-vs-KL figure: its axes name what they show, and both curves start at the SFT point."""

import numpy as np

from warp_rlhf.stages.plots import front_figure


def point(kind: str, kl: float, reward: float, **meta) -> dict:
    return {"kind": kind, "kl_exact_mean": kl, "kl_exact_se": 0.1, "reward_mean": reward, "reward_se": 0.05, **meta}


POLICIES = {
    "sft": point("sft", 0.0, 0.0, nu=0.0),
    "liti_0.5": point("liti", 1.0, 0.5, nu=0.5),
    "warp": point("liti", 3.0, 1.0, nu=1.0),
    "reinforce_12": point("reinforce", 4.0, 0.9, step=12),
    "reinforce_24": point("reinforce", 9.0, 1.5, step=24),
}


def test_the_y_axis_names_the_metric_and_the_x_axis_the_kl():
    figure = front_figure(POLICIES, "reward", "mean reward-model score")
    (axes,) = figure.axes
    assert axes.get_ylabel() == "mean reward-model score"  # not a policy's annotation ("step 24")
    assert axes.get_xlabel().startswith("KL(π ‖ π_sft)")


def test_the_front_and_the_trajectory_start_at_the_sft_point():
    figure = front_figure(POLICIES, "reward", "mean reward-model score")
    lines = {container.get_label(): container.lines[0] for container in figure.axes[0].containers}
    front = lines["WARP LITI front (1−ν)θ_sft + νθ_slerp"]
    trajectory = lines["REINFORCE baseline (trajectory)"]
    assert np.allclose(front.get_xdata(), [0.0, 1.0, 3.0]) and np.allclose(front.get_ydata(), [0.0, 0.5, 1.0])
    assert np.allclose(trajectory.get_xdata(), [0.0, 4.0, 9.0]) and np.allclose(trajectory.get_ydata(), [0, 0.9, 1.5])
