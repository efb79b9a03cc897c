"""Latency and SLO attainment against request rate, one line per layout (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path


def attainment(run: dict) -> float | None:
    """The share of good requests under --slo; without it, the share of requests within the p50
    slowdown limits of their own TTFT and E2E (2x and 1.25x of alone), which the plot labels."""
    if "absolute" in run:
        return run["absolute"]["attainment"]
    return run.get("within_p50_slowdown")


def plot(runs: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rated = [r for r in runs if r.get("rate")]
    if not rated:
        raise ValueError("--plot draws figures against the request rate: give --rate R1,R2,... or --sweep")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), constrained_layout=True)
    panels = [("ttft_s", "TTFT (ms)"), ("tbt_s", "TBT, every gap (ms)"), ("e2e_s", "E2E (ms)")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, layout in enumerate(dict.fromkeys(r["layout"] for r in rated)):
        mine = sorted((r for r in rated if r["layout"] == layout), key=lambda r: r["rate"])
        rates, color = [r["rate"] for r in mine], colors[i % len(colors)]
        for ax, (key, _) in zip(axes, panels):
            for q, style in (("p50", "--"), ("p99", "-")):
                ys = [r[key][q] * 1000 if r[key] else float("nan") for r in mine]
                ax.plot(rates, ys, style, color=color, marker="o", ms=3, label=f"{layout} {q}")
        att = [attainment(r) for r in mine]
        axes[3].plot(rates, [a if a is not None else float("nan") for a in att], color=color, marker="o", ms=3,
                     label=layout)
        for r in mine:  # a square where the run met its SLOs
            if r["met"]:
                axes[3].plot([r["rate"]], [attainment(r) or 0.0], "s", color=color, ms=7, mfc="none")
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("requests/s")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    label = ("share of requests meeting --slo" if any("absolute" in r for r in rated)
             else "share within 2x TTFT and 1.25x E2E of alone")
    axes[3].set_title("SLO attainment (square: run met its SLOs)")
    axes[3].set_ylabel(label, fontsize=8)
    axes[3].set_xlabel("requests/s")
    axes[3].set_ylim(0, 1.02)
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=7)
    fig.suptitle(f"{meta.get('target', '')}: {meta.get('workload', '')}, devices {','.join(meta.get('devices', []))}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
