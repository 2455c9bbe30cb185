"""The demo figure says what the data say: nothing clamped into an edge bin, every scatter
label by its own point, labelled axes."""

from __future__ import annotations

import math

import pytest
import torch

from torch_regularizers import demo

pytest.importorskip("matplotlib")


def test_magnitude_counts_partition_every_weight_and_clamp_nothing():
    w = torch.tensor([0.0, -0.0, 1e-45, -3e-7, 9.9e-7, 1e-6, -0.5, 10.0, 10.5, -1e3])
    c = demo.magnitude_counts(w, -6.0, 1.0)
    assert c["zeros"] == 2
    assert c["under"] == 3  # 1e-45, 3e-7, 9.9e-7: below the axis, counted apart
    assert c["over"] == 2  # 10.5, 1e3
    assert sorted(c["values"].tolist()) == pytest.approx([1e-6, 0.5, 10.0])
    assert c["zeros"] + c["under"] + c["over"] + c["values"].numel() == c["total"] == w.numel()


def _bbox_point_distance(bb, x, y):
    dx = max(bb.x0 - x, 0.0, x - bb.x1)
    dy = max(bb.y0 - y, 0.0, y - bb.y1)
    return math.hypot(dx, dy)


# the demo's own points at --seed 0 (README table): three near x = 0, three near x = 90..97
# with two of them at the same accuracy
SEED0 = [("none", 0, 98.4), ("l2 (loss term)", 0, 98.9), ("l2 decoupled", 0, 98.7),
         ("l1 prox", 97.3, 98.2), ("group lasso prox", 89.1, 98.4), ("elastic net prox", 92.3, 98.2)]


@pytest.mark.parametrize("points", [SEED0, [("a", 50, 98.0), ("b", 51, 98.0), ("c", 52, 98.0)]])
def test_scatter_labels_sit_by_their_own_points_and_do_not_overlap(points):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 6), dpi=110)
    xy = [(x, y) for _, x, y in points]
    for x, y in xy:
        ax.scatter(x, y, s=70)
    ax.set_xlim(-5, 105)
    ax.set_ylim(97.2, 99.5)
    labels = demo.place_labels(ax, xy, [n for n, _, _ in points])
    r = fig.canvas.get_renderer()
    from matplotlib.text import Text

    for t in labels:
        t.get_window_extent(r)  # lays the annotation out
    boxes = [Text.get_window_extent(t, r) for t in labels]  # the text, without a leader line
    disp = [ax.transData.transform(p) for p in xy]
    axbox = ax.get_window_extent(r)
    for i, bb in enumerate(boxes):
        assert axbox.x0 <= bb.x0 and bb.x1 <= axbox.x1, labels[i].get_text()
        for j, other in enumerate(boxes):
            if j != i:
                assert not bb.overlaps(other), (labels[i].get_text(), labels[j].get_text())
        own = _bbox_point_distance(bb, *disp[i])
        others = [_bbox_point_distance(bb, *disp[j]) for j in range(len(disp)) if j != i]
        # by its own point: closer to it than to any other, or joined to it by a leader line
        assert own < min(others) or labels[i].arrow_patch is not None, labels[i].get_text()
    plt.close(fig)


def test_figure_histograms_have_labelled_axes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    methods = [m for m in demo.METHODS if m.name in ("none", "l2 (loss term)")]
    s = demo.run(epochs=1, seed=0, out=tmp_path, plot=False, progress=False, methods=methods)
    saved = {}
    monkeypatch.setattr(plt, "close", lambda fig: saved.setdefault("fig", fig))
    demo.make_figure(s["results"], s["models"], tmp_path / "f.png", epochs=1, seed=0)
    axes = saved["fig"].axes
    scatter, hists = axes[0], axes[1:]
    assert scatter.get_xlabel() and scatter.get_ylabel()
    assert len(hists) == 2
    assert hists[0].get_ylabel() == "number of weights"
    assert hists[-1].get_xlabel() == "|w| of the non-zero weights"  # the bottom row's
    # nothing silently folded into the first bin: the text says how many were below the axis
    for h, r in zip(hists, s["results"]):
        text = " ".join(t.get_text() for t in h.texts)
        w = torch.cat([p.detach().flatten() for p in demo.weight_tensors(s["models"][r["method"]]).values()])
        under = int(((w != 0) & (w.abs() < 1e-6)).sum())
        assert "exact zeros" in text and f"0 < |w| < 1e-6 (hatched): {under}" in text, text
