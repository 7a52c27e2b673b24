"""The README's comparison results from a finished search sweep: the fairness verdict, the budget and final tables
as markdown, and the figures (search histories, accuracy against cost, P(beats)) under nbs/images/.

Usage: python tools/comparison_results.py --parent <parent run id> [--tracking-uri URI] [--images nbs/images]
"""
import argparse
from pathlib import Path

from echoes import compare


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", required=True, help="the search sweep's parent run id")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite under runs/)")
    p.add_argument("--images", type=Path, default=Path(__file__).resolve().parent.parent / "nbs" / "images")
    a = p.parse_args(argv)
    proto = compare.protocol(a.parent, a.tracking_uri)
    if proto is None: raise SystemExit(f"run {a.parent} is not a finished search sweep (no protocol.json)")
    df = compare.runs(a.parent, a.tracking_uri)
    fair = compare.fairness(proto, df)
    print(f"**{fair['verdict']}**\n")
    for c in fair["checks"]: print(f"- {'yes' if c['ok'] else 'NO'}: {c['check']}: {c['detail']}")
    print(f"\n{fair['conclusion']}\n")
    budgets = compare.budget_table(proto)
    print(compare.to_markdown(budgets.astype(object).where(budgets.notna(), "-")), "\n")
    print(compare.to_markdown(compare.format_final_table(compare.final_table(df, proto))), "\n")
    a.images.mkdir(parents=True, exist_ok=True)
    final = compare.final_runs(df)
    figures = {"search_history.png": compare.plot_search_history(compare.search_history(df, protocol=proto)),
               "comparison.png": compare.plot_tradeoffs(final),
               "beats.png": compare.plot_beats(compare.beats_matrix(final))}
    for name, fig in figures.items():
        fig = getattr(fig, "figure", fig)  # a function that drew on axes returns them
        fig.savefig(a.images / name, dpi=110, bbox_inches="tight")
        print(f"wrote {a.images / name}")


if __name__ == "__main__":
    main()
