"""The report's four plots, drawn with matplotlib and returned as PNG bytes: speed by thread count,
size against perplexity, task accuracy, and the quant search's candidates (size and speed against agreement
with the f16 GGUF's answers)."""

from __future__ import annotations

import io


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_throughput(records: list[dict], serve: str, recommended: int) -> bytes:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for r in (r for r in records if r["kind"] == "gguf"):
        threads = [b["threads"] for b in r["bench"]]
        for ax, key in zip(axes, ("pp_tps", "tg_tps"), strict=True):
            ax.plot(threads, [b[key] for b in r["bench"]], marker="o", linewidth=2, label=r["label"])
    serving = next(r for r in records if r["stage"] == serve)
    best = next(b for b in serving["bench"] if b["threads"] == recommended)
    axes[1].scatter([recommended], [best["tg_tps"]], s=250, facecolors="none", edgecolors="black", zorder=3,
                    label=f"recommended for {serve}: {recommended}")  # fmt: skip
    for ax, title in zip(axes, ("prompt processing", "generation"), strict=True):
        ax.set(title=f"{title} (llama-bench)", xlabel="threads", ylabel="tokens/s")
        ax.set_xticks(sorted({b["threads"] for r in records if r["kind"] == "gguf" for b in r["bench"]}))
        ax.grid(alpha=0.3)
        ax.legend()
    data = png(fig)
    plt.close(fig)
    return data


def plot_size_vs_perplexity(records: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for r in records:
        ax.errorbar(r["size_bytes"] / 2**20, r["perplexity"], yerr=r["perplexity_err"], fmt="o", markersize=9,
                    capsize=4, label=r["label"])  # fmt: skip
        ax.annotate(r["stage"], (r["size_bytes"] / 2**20, r["perplexity"]), textcoords="offset points",
                    xytext=(8, 6))  # fmt: skip
    ax.set(title="size vs. perplexity", xlabel="size on disk (MiB)", ylabel="perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    data = png(fig)
    plt.close(fig)
    return data


def plot_accuracy(records: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if all("accuracy" in r for r in records):
        bars = ax.bar([r["label"] for r in records], [r["accuracy"] for r in records], color="C0")
        ax.bar_label(bars, labels=[f"{r['correct']}/{r['rows']}" for r in records])
        ax.set(ylim=(0, 1.1), ylabel="exact match")
    else:
        ax.text(0.5, 0.5, "this model has no task (config models[].task)", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("task accuracy, greedy, held-out rows")
    data = png(fig)
    plt.close(fig)
    return data


def plot_frontier(records: list[dict], auto: dict | None) -> bytes:
    """The search's candidates: size and generation speed against agreement with the f16 GGUF's answers (KL
    divergence without a task), each candidate a point, passing ones filled, the chosen one a star."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    if auto is None:
        for ax in axes:
            ax.set_axis_off()
        axes[0].text(0.5, 0.5, "no quant search: add auto to quant_types", ha="center", va="center")
        data = png(fig)
        plt.close(fig)
        return data
    measured = [c for c in auto["candidates"] if c.get("verified") or c.get("tg_tps") is not None]
    by_task = any("fidelity" in c for c in measured)

    def quality(c: dict) -> float | None:
        if by_task:
            return c["fidelity"]["agreement"] if "fidelity" in c else None
        return c.get("kl_divergence")

    for ax, key, label in zip(axes, ("size_bytes", "tg_tps"), ("size on disk (MiB)", "generation tokens/s"),
                              strict=True):  # fmt: skip
        scale = 2**20 if key == "size_bytes" else 1
        for passed, style in ((True, {"color": "C0"}), (False, {"facecolors": "none", "edgecolors": "C7"})):
            points = [c for c in measured if bool(c.get("passed")) == passed and quality(c) is not None
                      and c.get(key) is not None]  # fmt: skip
            ax.scatter([c[key] / scale for c in points], [quality(c) for c in points], s=40,
                       label="passes the gate" if passed else "fails", **style)  # fmt: skip
            for c in points:
                ax.annotate(c["name"].removeprefix("uniform "), (c[key] / scale, quality(c)), fontsize=7,
                            textcoords="offset points", xytext=(4, 3))  # fmt: skip
        chosen = next(c for c in measured if c["name"] == auto["chosen"])
        ax.scatter([chosen[key] / scale], [quality(chosen)], marker="*", s=300, color="C3", zorder=3, label="chosen")
        ax.set(xlabel=label, ylabel="answers as the f16 GGUF's" if by_task else "KL divergence from f16")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"quant search candidates (objective: {auto['objective']})")
    data = png(fig)
    plt.close(fig)
    return data


def draw(records: list[dict], serve: str, recommended: int, auto: dict | None = None) -> dict[str, bytes]:
    """The four plots by name, in the order the report and make_eval_report's --plots take them."""
    return {
        "throughput": plot_throughput(records, serve, recommended),
        "size_vs_perplexity": plot_size_vs_perplexity(records),
        "accuracy": plot_accuracy(records),
        "frontier": plot_frontier(records, auto),
    }
