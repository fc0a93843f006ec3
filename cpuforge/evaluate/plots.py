"""The report's four plots, drawn with matplotlib and returned as PNG bytes: speed by thread count,
size against perplexity, task accuracy, and the quant search's frontier (size against KL divergence and
against task accuracy)."""

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
    """Size against KL divergence and against task accuracy: each uniform quant a point, the search's
    candidates a line, the chosen file a star."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    if auto is None:
        for ax in axes:
            ax.set_axis_off()
        axes[0].text(0.5, 0.5, "no quant search: add auto to quant_types", ha="center", va="center")
        data = png(fig)
        plt.close(fig)
        return data
    quants = [r for r in records if r["kind"] == "gguf" and "kl_divergence" in r]
    candidates = sorted(auto["candidates"], key=lambda c: c["size_bytes"])
    chosen = next(r for r in quants if r["stage"] == "auto")
    for ax, key, title in zip(axes, ("kl_divergence", "accuracy"), ("KL divergence from f16", "task accuracy"),
                              strict=True):  # fmt: skip
        uniform = [r for r in quants if r["stage"] != "auto" and key in r]
        ax.scatter([r["size_bytes"] / 2**20 for r in uniform], [r[key] for r in uniform], s=60, label="uniform types")
        for r in uniform:
            ax.annotate(r["stage"], (r["size_bytes"] / 2**20, r[key]), textcoords="offset points", xytext=(6, 4))
        measured = [c for c in candidates if key in c]
        ax.plot([c["size_bytes"] / 2**20 for c in measured], [c[key] for c in measured], marker=".", linewidth=1.5,
                color="C1", label="searched mixes")  # fmt: skip
        if key in chosen:
            ax.scatter([chosen["size_bytes"] / 2**20], [chosen[key]], marker="*", s=300, color="C3", zorder=3,
                       label="chosen (auto)")  # fmt: skip
        ax.set(title=title, xlabel="size on disk (MiB)", ylabel=key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
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
