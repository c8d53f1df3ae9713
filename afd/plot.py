"""The timeline picture: one row per role, one colour per micro-batch, waits hatched grey (needs the `plot` extra)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import AfdError
from .metrics import INSTANT, _role_order, unit_keys


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise AfdError("--plot", "needs matplotlib: pip install 'afd-sim[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(events, cfg, path: str | os.PathLike, title: str | None = None, width: float = 14.0,
                  show_waits: bool = True) -> Path:
    """Draw the events of one run to a PNG: ops coloured by micro-batch, so overlap and bubbles show."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    roles = [r for r in cfg.role_ids() if r != "controller"]
    roles += sorted({e.role for e in events} - set(roles), key=_role_order)
    row = {r: i for i, r in enumerate(roles)}
    t_base = min((e.t0 for e in events), default=0)
    t_end = max((e.t1 for e in events), default=1)
    M = cfg.micro_batch_num
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(roles) + 1.6), dpi=110)
    for e in events:
        if e.name in INSTANT or e.role not in row:
            continue
        x, w = (e.t0 - t_base) / 1e6, max((e.t1 - e.t0) / 1e6, 1e-4)
        y = row[e.role]
        if e.name == "wait":
            if show_waits:
                ax.broken_barh([(x, w)], (y - 0.12, 0.24), facecolors="0.85", edgecolor="none")
            continue
        keys = unit_keys(e, cfg.layers)
        mb = keys[0][1] if keys else e.micro_batch
        if e.role.startswith("ffn") and not keys:  # the FFN scheduler's poll: not yet any micro-batch's
            mb = -1
        colour = colours(mb % 10) if mb >= 0 else "0.6"
        compute = e.name in ("attention", "experts")
        ax.broken_barh([(x, w)], (y - 0.38, 0.76) if compute else (y - 0.25, 0.5), facecolors=colour,
                       edgecolor="black" if compute else "none", linewidth=0.3, alpha=1.0 if compute else 0.55)
    ax.set_yticks(range(len(roles)))
    ax.set_yticklabels(roles)
    ax.invert_yaxis()
    ax.set_xlim(0, (t_end - t_base) / 1e6)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(facecolor=colours(m % 10), label=f"micro-batch {m}") for m in range(min(M, 10))]
    if show_waits:
        handles.append(Patch(facecolor="0.85", label="waiting"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(roles) < 6 else -0.1),
              ncol=len(handles), frameon=False, fontsize=8)
    ax.set_title(title or f"{cfg.name}: M={M} L={cfg.layers} steps={cfg.steps} "
                          "(tall bars: attention / experts; thin: other ops)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_result(result, path: str | os.PathLike, title: str | None = None) -> Path:
    return plot_timeline(result.events, result.config, path, title)
