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


def test_labels_that_would_overlap_are_left_out_and_the_ends_kept():
    """A front of 11 points crowded near the SFT point: the end and the points apart are labelled,
    the crowded ones not, and no two labels fall on one another."""
    crowded = {"sft": point("sft", 0.0, 0.0, nu=0.0)}
    for index in range(1, 10):
        crowded[f"liti_{index / 10:g}"] = point("liti", 0.01 * index, 0.01 * index, nu=index / 10)
    crowded["warp"] = point("liti", 5.0, 2.0, nu=1.0)
    crowded["reinforce_24"] = point("reinforce", 9.0, 1.5, step=24)
    texts = [text.get_text() for text in front_figure(crowded, "reward", "mean reward").axes[0].texts]
    assert "warp" in texts and "step 24" in texts and "ν=0.9" in texts
    assert len(texts) == 3, texts


def test_labels_apart_are_all_kept():
    texts = [text.get_text() for text in front_figure(POLICIES, "reward", "mean reward").axes[0].texts]
    assert sorted(texts) == ["step 12", "step 24", "warp", "ν=0.5"]


def test_the_training_curves_say_reward_not_reward_model_score(tmp_path):
    import json

    from warp_rlhf.stages.plots import training_curves_figure

    run = tmp_path / "iter_1" / "run_1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward_mean": 0.1 * s, "kl_to_anchor": 0.01 * s}) + "\n" for s in (1, 2))
    )
    top, _ = training_curves_figure(tmp_path).axes
    assert top.get_ylabel() == "mean reward r(x, y) of the batch"
