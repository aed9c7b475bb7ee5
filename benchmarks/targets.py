"""Ratios between sections of one harness run, and the issue's targets as met / missed.

Every ratio is taken between numbers of the same ``results`` dict, i.e. of one invocation.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.harness import KIB, MIB


def _rows(results: dict[str, Any], section: str) -> list[dict[str, Any]]:
    got = results.get(section)
    return [r for r in got if "error" not in r] if isinstance(got, list) else []


def compare(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Peers against insitu on the same work (back-to-back, window 1; sleep-paced slowdown)."""
    rows = []
    ours = {r["size"]: r for r in _rows(results, "insitu") if r["pace"] == "b2b" and r["window"] == 1}
    base = {r["size"]: r for r in _rows(results, "paced") if r["pace"] == "sleep"}
    for peer in ("deisa", "adios2", "posthoc"):
        for row in _rows(results, peer):
            mine = ours.get(row["size"])
            if row.get("pace", "none") == "sleep":
                b = base.get(row["size"])
                if b is not None:
                    slow = row["loop_median_s"] / statistics.mean(b["baseline_loop_s"]) - 1
                    rows.append({"peer": peer, "size": row["size"], "slowdown_sleep": slow,
                                 "insitu_slowdown_sleep": b["slowdown"]})  # fmt: skip
                    print(f"compare {peer:7} {row['size'] // KIB:>7} KiB sleep-paced slowdown {slow * 100:+7.2f} % "
                          f"(insitu {b['slowdown'] * 100:+6.2f} %)", flush=True)  # fmt: skip
                continue
            if mine is None or not mine.get("e2e_per_step_s"):
                continue
            speedup = row["e2e_per_step_s"] / mine["e2e_per_step_s"]
            rows.append({"peer": peer, "size": row["size"], "e2e_speedup": speedup,
                         "send_ratio": row["send_median_s"] / mine["send_median_s"]})  # fmt: skip
            print(f"compare {peer:7} {row['size'] // KIB:>7} KiB: insitu end-to-end {speedup:7.2f}x faster, "
                  f"send {rows[-1]['send_ratio']:7.2f}x cheaper", flush=True)  # fmt: skip
    return rows


def _target(name: str, measured: str, met: bool | None, valid: bool = True) -> dict[str, Any]:
    """One target's row; ``valid`` false: the measurement's own condition (a noise floor) failed."""
    verdict = "not measured" if met is None else ("MISSED" if not met else ("met" if valid else "inconclusive"))
    return {"target": name, "measured": measured, "met": met, "verdict": verdict}


def _e2e_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    ours = {r["size"]: r for r in _rows(results, "insitu") if r["pace"] == "b2b" and r["window"] == 1}
    floors = {r["size"]: r["e2e_floor_s"] for r in results.get("floor", [])}
    deisa = {r["size"]: r for r in _rows(results, "deisa") if r.get("pace", "none") == "none"}
    sst = {r["size"]: r for r in _rows(results, "adios2")}
    for size, mine in sorted(ours.items()):
        e2e = mine.get("e2e_per_step_s")
        if not e2e:
            continue
        fl = floors.get(size, mine["e2e_floor_s"])
        vs_floor = e2e / fl
        vs_deisa = deisa[size]["e2e_per_step_s"] / e2e if size in deisa else None
        met = vs_floor <= 1.5 or (vs_deisa is not None and vs_deisa >= 20)
        deisa_txt = f"{vs_deisa:.1f}x faster than deisa-ray" if vs_deisa is not None else "deisa-ray not measured"
        out.append(
            _target(
                f"end-to-end {size // KIB} KiB: >= 20x deisa-ray or <= 1.5x floor",
                f"{e2e * 1e3:.2f} ms = {vs_floor:.1f}x the floor ({fl * 1e3:.3f} ms); {deisa_txt}",
                met,
            )
        )
        if size not in sst:
            out.append(_target(f"end-to-end {size // KIB} KiB vs ADIOS2 SST", "SST not measured", None))
            continue
        s = sst[size]["e2e_per_step_s"]
        if size <= 512 * KIB:
            out.append(
                _target(
                    f"end-to-end {size // KIB} KiB <= 2x ADIOS2 SST",
                    f"{e2e * 1e3:.2f} vs {s * 1e3:.2f} ms = {e2e / s:.2f}x SST",
                    e2e / s <= 2,
                )
            )
        elif size >= 8 * MIB:
            out.append(
                _target(
                    f"end-to-end {size // KIB} KiB >= 5x faster than ADIOS2 SST",
                    f"{e2e * 1e3:.2f} vs {s * 1e3:.2f} ms = {s / e2e:.2f}x faster",
                    s / e2e >= 5,
                )
            )
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measurement from this run and met / MISSED / not measured."""
    out = _e2e_targets(results)
    for row in _rows(results, "paced"):
        if row["pace"] == "sleep":
            out.append(_target(f"slowdown {row['size'] // KIB} KiB, sleep 200 ms, 4 ranks <= 2 % (noise < 1 %)",
                               f"{row['slowdown'] * 100:+.2f} % (noise floor {row['noise'] * 100:.2f} %)",
                               row["slowdown"] <= 0.02, row["noise"] < 0.01))  # fmt: skip
    st = results.get("startup", {})
    for kind in ("spawned", "prestarted"):
        if "ratio" in st.get(kind, {}):
            out.append(_target(f"start-up {st['ranks']} ranks on {st['nodes']} raylets <= 2x without insitu ({kind} "
                               "driver)", f"{st[kind]['startup_median_s']:.2f} s vs "
                               f"{st['without']['startup_median_s']:.2f} s = {st[kind]['ratio']:.2f}x",
                               st[kind]["ratio"] <= 2))  # fmt: skip
    if "rss_added_max_mb" in st:
        out.append(_target("memory added <= 50 MB on every rank", f"max {st['rss_added_max_mb']:.1f} MB (rank 0 "
                           f"{st['rss_added_rank0_mb']:.1f} MB, others median {st['rss_added_others_median_mb']:.1f} "
                           "MB)", st["rss_added_max_mb"] <= 50))  # fmt: skip
    out.append(_target("scale model: <= 10 ms head CPU per step at 1,024 nodes", "python -m benchmarks.scale_model",
                       None))  # fmt: skip
    return out


def print_targets(rows: list[dict[str, Any]]) -> None:
    """One line per target."""
    print("targets:", flush=True)
    for r in rows:
        print(f"  [{r['verdict']:>12}] {r['target']}: {r['measured']}", flush=True)
