"""Markdown tables of one harness run, as quoted by docs/performance.md.

Usage::

    python -m benchmarks.report benchmarks/results/2026-11-25.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import KIB, MIB


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def _ms(x: float | None) -> str:
    if x is None:
        return "–"
    v = x * 1e3
    return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def _spread(s: dict[str, float]) -> str:
    return f"{_ms(s['median'])} ({_ms(s['min'])} – {_ms(s['max'])})"


def _ok(results: dict[str, Any], section: str) -> list[dict[str, Any]]:
    got = results.get(section)
    return [r for r in got if "error" not in r] if isinstance(got, list) else []


def floor_table(r: dict[str, Any]) -> list[str]:
    """The floor with its spread (median (min – max))."""
    out = ["| chunk per rank | copy into fresh pages | copy into warm memory | step floor: 4 fresh copies + 1 read |",
           "|---|---|---|---|"]  # fmt: skip
    for f in r.get("floor", []):
        out.append(f"| {_size(f['size'])} | {_spread(f['copy_fresh'])} | {_spread(f['copy_warm'])} | "
                   f"{_spread(f['e2e_floor'])} |")  # fmt: skip
    if "empty_actor_call" in r:
        out.append("")
        out.append(f"Empty Ray actor call (idle actor): {_spread(r['empty_actor_call'])}.")
    return out


def e2e_table(r: dict[str, Any]) -> list[str]:
    """End-to-end per step, back-to-back, 4 ranks: insitu, floor, SST, deisa-ray, post hoc, as ratios."""
    floors = {f["size"]: f["e2e_floor_s"] for f in r.get("floor", [])}
    peers = {p: {x["size"]: x for x in _ok(r, p) if x.get("pace", "none") == "none"} for p in ("deisa", "adios2",
                                                                                               "posthoc")}  # fmt: skip
    out = ["| chunk | insitu | ÷ step floor | ADIOS2 SST | insitu ÷ SST | deisa-ray | deisa-ray ÷ insitu | "
           "post hoc `.npy` |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in _ok(r, "insitu"):
        if row["pace"] != "b2b" or row["window"] != 1 or not row.get("e2e_per_step_s"):
            continue
        s, e = row["size"], row["e2e_per_step_s"]
        sst, dei, post = (peers[p].get(s, {}).get("e2e_per_step_s") for p in ("adios2", "deisa", "posthoc"))
        fl = floors.get(s, row["e2e_floor_s"])
        out.append(f"| {_size(s)} | {_ms(e)} | {e / fl:.2f}× | {_ms(sst)} | {f'{e / sst:.2f}×' if sst else '–'} | "
                   f"{_ms(dei)} | {f'{dei / e:.2f}×' if dei else '–'} | {_ms(post)} |")  # fmt: skip
    return out


def send_table(r: dict[str, Any]) -> list[str]:
    """insitu's send cost and end-to-end time per step, every pacing."""
    out = ["| chunk | pacing | window | send median | send p95 | send ÷ fresh copy | end-to-end per step | tries |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in _ok(r, "insitu"):
        out.append(f"| {_size(row['size'])} | {row['pace']} | {row['window']} | {_ms(row['send_median_s'])} | "
                   f"{_ms(row['send_p95_s'])} | {row['send_median_s'] / row['copy_fresh_s']:.1f}× | "
                   f"{_ms(row.get('e2e_per_step_s'))} | {row['attempts']} |")  # fmt: skip
    return out


def paced_table(r: dict[str, Any]) -> list[str]:
    """Slowdown with the noise floor, insitu and deisa-ray."""
    deisa = {c["size"]: c["slowdown_sleep"] for c in r.get("compare", []) if "slowdown_sleep" in c}
    out = ["| chunk | compute phase | ranks | insitu | deisa-ray | noise floor | send median (insitu) |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in _ok(r, "paced"):
        d = deisa.get(row["size"]) if row["pace"] == "sleep" else None
        phase = "sleep 200 ms" if row["pace"] == "sleep" else "numpy stencil"
        out.append(f"| {_size(row['size'])} | {phase} | {row['ranks']} | {row['slowdown'] * 100:+.2f} % | "
                   f"{'–' if d is None else f'{d * 100:+.1f} %'} | {row['noise'] * 100:.2f} % | "
                   f"{_ms(row['send_median_s'])} |")  # fmt: skip
    return out


def cpu_table(r: dict[str, Any]) -> list[str]:
    """CPU milliseconds per step of every control-path process."""
    rows = _ok(r, "cpu")
    roles = sorted({k for row in rows for k in row["roles"]}, key=lambda k: -max(
        row["roles"].get(k, {"per_step_s": 0})["per_step_s"] for row in rows))  # fmt: skip
    out = ["| process (count) | " + " | ".join(_size(row["size"]) for row in rows) + " |",
           "|---|" + "---|" * len(rows)]  # fmt: skip
    for k in roles:
        n = max(int(row["roles"].get(k, {"processes": 0})["processes"]) for row in rows)
        cells = [f"{row['roles'][k]['per_step_s'] * 1e3:.2f}" if k in row["roles"] else "–" for row in rows]
        out.append(f"| {k} ({n}) | " + " | ".join(cells) + " |")
    out.append("| **total** | " + " | ".join(f"**{row['total_per_step_s'] * 1e3:.1f}**" for row in rows) + " |")
    out.append("| end-to-end per step | " + " | ".join(_ms(row["e2e_per_step_s"]) for row in rows) + " |")
    return out


def startup_table(r: dict[str, Any]) -> list[str]:
    """Start-up at 16 ranks (without insitu, driver spawned by rank 0, driver pre-started) and RSS added."""
    st = r.get("startup", {})
    out = ["| ranks on raylets | start-up | ÷ without insitu | `Bridge()` on rank 0 | runs |", "|---|---|---|---|---|"]
    for kind, name in (("without", "without insitu"), ("spawned", "insitu, driver spawned by rank 0"),
                       ("prestarted", "insitu, driver pre-started (node processes started ahead)"),
                       ("no_prewarm", "insitu, driver pre-started with --no-prewarm (the design before)")):  # fmt: skip
        if kind in st:
            k = st[kind]
            init = ", ".join(f"{x:.1f} s" for x in k["init_rank0_s"]) if kind != "without" else "–"
            runs = ", ".join(f"{x:.1f} s" for x in k["startup_s"])
            out.append(f"| {name}: {st['ranks']} on {st['nodes']} | {k['startup_median_s']:.2f} s | "
                       f"{k.get('ratio', 1.0):.2f}× | {init} | {runs} |")  # fmt: skip
    if "rss_added_max_mb" in st:
        out += ["", f"RSS added by insitu (max RSS after set-up minus before, minus the same rank without insitu): "
                f"max over ranks {st['rss_added_max_mb']:.1f} MB, rank 0 {st['rss_added_rank0_mb']:.1f} MB, other "
                f"ranks median {st['rss_added_others_median_mb']:.1f} MB. One empty actor per raylet started and "
                f"called: {st.get('ray_actor_start_s', float('nan')):.2f} s."]  # fmt: skip
    for h in _ok(r, "hotcore"):
        out.append("")
        out.append(f"Hot-core send, {_size(h['size'])}, 1 rank, 10 ms busy phase: median {_ms(h['send_median_s'])}, "
                   f"p95 {_ms(h['send_p95_s'])}.")  # fmt: skip
    return out


def targets_table(r: dict[str, Any]) -> list[str]:
    """The targets as met / MISSED."""
    out = ["| target | measured (this run) | |", "|---|---|---|"]
    for t in r.get("targets", []):
        out.append(f"| {t['target']} | {t['measured']} | {'**MISSED**' if t['met'] is False else t['verdict']} |")
    return out


def main(argv: list[str] | None = None) -> int:
    """Print every table of the JSON file given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    r = json.loads(Path(args[0]).read_text())
    for title, fn in (("floor", floor_table), ("end-to-end", e2e_table), ("send", send_table),
                      ("paced", paced_table), ("cpu", cpu_table), ("startup", startup_table),
                      ("targets", targets_table)):  # fmt: skip
        print(f"<!-- {title} -->")
        print("\n".join(fn(r)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
