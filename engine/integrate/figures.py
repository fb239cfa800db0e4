"""Report figures, each saved as PNG (matplotlib, Agg) and interactive HTML (plotly).

The HTML files share one plotly.min.js written next to them (include_plotlyjs="directory"),
so they open offline and stay small.
"""

from __future__ import annotations

from pathlib import Path

DIRECTION_COLOURS = {"safe": "#1b9e77", "risky": "#d95f02", "mixed": "#7570b3", "unknown": "#999999"}


def _direction(d) -> str:
    return d if d in DIRECTION_COLOURS else "unknown"


def _save(fig_mpl, fig_plotly, folder: Path, name: str) -> dict:
    import matplotlib.pyplot as plt

    from engine.schema import AtomicFile

    folder.mkdir(parents=True, exist_ok=True)
    png, html = folder / f"{name}.png", folder / f"{name}.html"
    with AtomicFile(png) as tmp:
        fig_mpl.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig_mpl)
    # "directory": the page loads ./plotly.min.js, written once beside it (offline, small files).
    with AtomicFile(html) as tmp:
        fig_plotly.write_html(str(tmp), include_plotlyjs="directory", full_html=True)
    return {"name": name, "png": png, "html": html}


def layer_counts(records: list[dict], folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    layers = sorted({r["layer"] for r in records})
    dirs = [d for d in DIRECTION_COLOURS if any(_direction(r.get("direction")) == d for r in records)]
    counts = {d: [sum(1 for r in records if r["layer"] == l and _direction(r.get("direction")) == d) for l in layers]
              for d in dirs}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 3.6))
    bottom = [0] * len(layers)
    for d in dirs:
        ax.bar(layers, counts[d], bottom=bottom, color=DIRECTION_COLOURS[d], label=d)
        bottom = [b + c for b, c in zip(bottom, counts[d])]
    ax.set_xlabel("layer")
    ax.set_ylabel("selected causal features")
    ax.set_title("Selected causal features per layer, by direction")
    ax.legend(frameon=False)
    ax.set_xticks(layers)
    pf = go.Figure([go.Bar(x=layers, y=counts[d], name=d, marker_color=DIRECTION_COLOURS[d]) for d in dirs])
    pf.update_layout(barmode="stack", title="Selected causal features per layer, by direction",
                     xaxis_title="layer", yaxis_title="features", template="plotly_white")
    out = _save(fig, pf, folder, "layer_counts")
    out["title"] = "Selected causal features per layer, by direction"
    return out


def effect_sizes(records: list[dict], folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sx, sy = "delta_stop__safe_with_safe_patch", "delta_stop__risky_with_safe_patch"
    pf = make_subplots(rows=1, cols=2, subplot_titles=("Cohen's d by layer",
                                                       "Safe patch: change in stop rate, safe vs risky prompt"))
    for d, colour in DIRECTION_COLOURS.items():
        rs = [r for r in records if _direction(r.get("direction")) == d and r.get("cohen_d") is not None]
        if rs:
            axes[0].scatter([r["layer"] for r in rs], [r["cohen_d"] for r in rs], s=14, color=colour, label=d, alpha=0.8)
            pf.add_trace(go.Scatter(x=[r["layer"] for r in rs], y=[r["cohen_d"] for r in rs], mode="markers",
                                    name=d, marker_color=colour, text=[r["feature"] for r in rs], legendgroup=d),
                         row=1, col=1)
        rs = [r for r in records if _direction(r.get("direction")) == d and r.get(sx) is not None
              and r.get(sy) is not None]
        if rs:
            axes[1].scatter([r[sx] for r in rs], [r[sy] for r in rs], s=14, color=colour, label=d, alpha=0.8)
            pf.add_trace(go.Scatter(x=[r[sx] for r in rs], y=[r[sy] for r in rs], mode="markers", name=d,
                                    marker_color=colour, text=[r["feature"] for r in rs], legendgroup=d,
                                    showlegend=False), row=1, col=2)
    from matplotlib.ticker import MaxNLocator

    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].axhline(0, color="#888", lw=0.6)
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("Cohen's d (checkpoint)")
    axes[0].set_title("Cohen's d by layer")
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].axhline(0, color="#888", lw=0.6)
    axes[1].axvline(0, color="#888", lw=0.6)
    axes[1].set_xlabel("Δ stop rate, safe prompt (safe patch − baseline)")
    axes[1].set_ylabel("Δ stop rate, risky prompt (safe patch − baseline)")
    axes[1].set_title("Behavioural effect of the safe patch")
    if not any(r.get(sx) is not None for r in records):
        axes[1].text(0.5, 0.5, "no trials table", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    pf.update_xaxes(title_text="layer", row=1, col=1)
    pf.update_yaxes(title_text="Cohen's d", row=1, col=1)
    pf.update_xaxes(title_text="Δ stop, safe prompt", row=1, col=2)
    pf.update_yaxes(title_text="Δ stop, risky prompt", row=1, col=2)
    pf.update_layout(template="plotly_white", title="Effect sizes")
    out = _save(fig, pf, folder, "effect_sizes")
    out["title"] = "Effect sizes: Cohen's d by layer, and the safe patch's change in stop rate"
    return out


def hubs(union: dict, folder: Path, n: int = 20) -> dict | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    hs = union.get("hubs", [])[:n]
    if not hs:
        return None
    hs = hs[::-1]  # largest at the top of a horizontal bar chart
    colours = [DIRECTION_COLOURS[_direction(h.get("direction"))] if h["is_selected"] else "#4c72b0" for h in hs]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(hs) + 1.2))
    ax.barh([h["id"] for h in hs], [h["n_targets"] for h in hs], color=colours)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("selected targets whose pathway contains the feature")
    ax.set_title("Hub features of the union graph\n(blue: not selected; green/orange/purple: a selected safe/risky/mixed feature)",
                 fontsize=10)
    pf = go.Figure(go.Bar(y=[h["id"] for h in hs], x=[h["n_targets"] for h in hs], orientation="h",
                          marker_color=colours,
                          text=[f"|attr| {h['abs_attribution']:.3g}" for h in hs]))
    pf.update_layout(template="plotly_white", title="Hub features of the union graph",
                     xaxis_title="targets fed", height=max(300, 24 * len(hs) + 120))
    out = _save(fig, pf, folder, "hubs")
    out["title"] = "Hub features: upstream features shared by the most pathways"
    return out


def pathway_agreement(records: list[dict], prompts: list[str], folder: Path) -> dict | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    series = {p: [r[f"pathway_{p}_pearson_r"] for r in records if r.get(f"pathway_{p}_pearson_r") is not None]
              for p in prompts}
    series = {p: v for p, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for p, v in series.items():
        ax.hist(v, bins=20, range=(-1, 1), alpha=0.6, label=p)
    ax.set_xlabel("Pearson r, attribution vs replay change")
    ax.set_ylabel("targets")
    ax.set_title("Attribution-replay agreement per pathway")
    ax.legend(frameon=False)
    pf = go.Figure([go.Histogram(x=v, name=p, xbins=dict(start=-1, end=1, size=0.1), opacity=0.6)
                    for p, v in series.items()])
    pf.update_layout(barmode="overlay", template="plotly_white", title="Attribution-replay agreement per pathway",
                     xaxis_title="Pearson r", yaxis_title="targets")
    out = _save(fig, pf, folder, "pathway_agreement")
    out["title"] = "Attribution-replay agreement (Pearson r) per pathway and prompt"
    return out
