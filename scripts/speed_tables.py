"""The speed tables of docs/speed.md and the README, made from `scconv-tch bench --json` results.

    python3 scripts/speed_tables.py docs/bench/h200-fp32.json docs/bench/h200-bf16.json   # print them
    python3 scripts/speed_tables.py --write docs/speed.md README.md FILES...   # rewrite the marked parts
    python3 scripts/speed_tables.py --check docs/speed.md README.md FILES...   # fail if they differ

A document's tables sit between `<!-- speed-tables:KIND:begin -->` and `<!-- speed-tables:KIND:end -->`,
KIND `blocks`, `networks` (docs/speed.md) or `summary` (README.md).
"""
import argparse
import json
import re
import sys


def ms(timing):
    return timing["median_ms"] if timing else None


def ratio(a, b):
    return f"{a / b:.2f}x" if a is not None and b else "-"


def blocks_table(runs):
    lines = ["| dtype | shape | batch | reference ms | fast ms | conv3x3 ms | fast / conv | graph: fast ms | graph: conv ms | graph: fast / conv |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for b in run["blocks"]:
            fast, conv = ms(b["scconv_fast"]), ms(b["conv3x3"])
            gfast, gconv = ms(b.get("scconv_fast_graph")), ms(b.get("conv3x3_graph"))
            cell = lambda v: f"{v:.3f}" if v is not None else "-"
            lines.append(f"| {run['dtype']} | {b['channels']}@{b['size']} | {b['batch']} | {ms(b['scconv']):.3f} | "
                         f"{fast:.3f} | {conv:.3f} | **{ratio(fast, conv)}** | {cell(gfast)} | {cell(gconv)} | "
                         f"**{ratio(gfast, gconv)}** |")
    return "\n".join(lines)


def networks(run):
    return {n["name"]: n for n in run["networks"]}


def networks_table(runs):
    lines = ["| dtype | network | batch | eager images/s | CUDA graph images/s |", "|---|---|---:|---:|---:|"]
    for run in runs:
        for n in run["networks"]:
            graph = n.get("graph_images_per_second")
            lines.append(f"| {run['dtype']} | {n['name']} | {n['batch']} | {n['images_per_second']:,.0f} | "
                         f"{f'{graph:,.0f}' if graph else '-'} |")
    lines.append("")
    lines.append("| dtype | SC-ResNet-50 fast / ResNet-50, eager | the same, both under CUDA graphs |")
    lines.append("|---|---:|---:|")
    for run in runs:
        n = networks(run)
        sc, plain = n.get("sc_resnet50 (fast)"), n.get("resnet50")
        if sc and plain:
            graph = (ratio(sc["graph_images_per_second"], plain["graph_images_per_second"])
                     if sc.get("graph_images_per_second") else "-")
            lines.append(f"| {run['dtype']} | **{ratio(sc['images_per_second'], plain['images_per_second'])}** | "
                         f"**{graph}** |")
    return "\n".join(lines)


def summary_table(runs):
    lines = ["| dtype | fast ScConv / 3x3 conv, batch 64 (eager; CUDA graphs) | SC-ResNet-50 fast / ResNet-50 images/s (eager; CUDA graphs) |",
             "|---|---|---|"]
    for run in runs:
        big = [b for b in run["blocks"] if b["batch"] == max(x["batch"] for x in run["blocks"])]
        eager = [ms(b["scconv_fast"]) / ms(b["conv3x3"]) for b in big]
        graph = [ms(b["scconv_fast_graph"]) / ms(b["conv3x3_graph"]) for b in big if b.get("scconv_fast_graph")]
        n = networks(run)
        sc, plain = n["sc_resnet50 (fast)"], n["resnet50"]
        net = f"{sc['images_per_second'] / plain['images_per_second']:.2f}x"
        if sc.get("graph_images_per_second"):
            net += f"; {sc['graph_images_per_second'] / plain['graph_images_per_second']:.2f}x"
        span = lambda v: f"{min(v):.2f}-{max(v):.2f}x" if v else "-"
        lines.append(f"| {run['dtype']} | {span(eager)}; {span(graph)} | {net} |")
    return "\n".join(lines)


TABLES = {"blocks": blocks_table, "networks": networks_table, "summary": summary_table}


def replace(text, runs):
    """The text with its marked tables rewritten, and the kinds of table it marks."""
    found = []
    for kind, make in TABLES.items():
        pattern = re.compile(rf"(<!-- speed-tables:{kind}:begin -->\n)(?:.*?\n)?(<!-- speed-tables:{kind}:end -->)", re.S)
        text, count = pattern.subn(lambda m: m.group(1) + make(runs) + "\n" + m.group(2), text)
        found += [kind] * count
    return text, found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs=2, metavar=("SPEED_MD", "README"), help="rewrite the marked tables")
    parser.add_argument("--check", nargs=2, metavar=("SPEED_MD", "README"), help="fail if the tables differ")
    parser.add_argument("results", nargs="+", help="`scconv-tch bench --json` outputs")
    args = parser.parse_args()
    runs = [json.load(open(path)) for path in args.results]
    documents = args.write or args.check
    if not documents:
        for kind, make in TABLES.items():
            print(f"{kind}:\n{make(runs)}\n")
        return 0
    stale, marked = [], []
    for path in documents:
        text = open(path).read()
        updated, found = replace(text, runs)
        if not found:
            print(f"{path} has no speed-tables markers (<!-- speed-tables:KIND:begin/end -->)", file=sys.stderr)
            return 1
        marked += found
        if args.write:
            open(path, "w").write(updated)
        elif updated != text:
            stale.append(path)
    missing = [kind for kind in TABLES if kind not in marked]
    twice = sorted({kind for kind in marked if marked.count(kind) > 1})
    if missing or twice:
        print(f"speed tables: missing {missing}, marked more than once {twice}", file=sys.stderr)
        return 1
    if stale:
        print(f"speed tables out of date in {', '.join(stale)}: run scripts/speed_tables.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
