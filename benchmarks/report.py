"""From raw wrk runs to medians, ratios, the budget lines and the terminal table."""

from __future__ import annotations

import math
import statistics
from typing import Any

Runs = dict[str, dict[str, dict[str, list[dict[str, Any]]]]]  # load -> concurrency -> target -> runs
Cells = dict[str, dict[str, dict[str, dict[str, Any]]]]  # load -> concurrency -> target -> medians

FG, FG_TMPFS, FG_OFF = "fg", "fg-tmpfs", "fg-noaudit"
LOAD_TITLES = {"record": "one client record", "listing": "50-row list, 4 sealed fields a row shown in clear",
               "write": "PATCH a session note (sealed on the way in)"}


def medians(runs: Runs) -> Cells:
    """The median of each figure over a cell's repetitions (figures are taken separately)."""
    out: Cells = {}
    for load, by_c in runs.items():
        for c, by_t in by_c.items():
            for target, rs in by_t.items():
                ok = [r for r in rs if r["errors"] == 0 and r["requests"] > 0]
                if not ok:
                    out.setdefault(load, {}).setdefault(c, {})[target] = {"invalid": True, "runs": len(rs)}
                    continue
                cell = {k: statistics.median(r[k] for r in ok)
                        for k in ("rps", "p50_ms", "p99_ms", "cpu_us", "server_util", "crm_cpu_us")}
                batches = [r["audit_batch"] for r in ok if r.get("audit_batch")]
                cell["audit_batch"] = statistics.median(batches) if batches else None
                cell["runs"] = len(ok)
                cell["rps_spread"] = (max(r["rps"] for r in ok) - min(r["rps"] for r in ok)) / cell["rps"]
                out.setdefault(load, {}).setdefault(c, {})[target] = cell
    return out


def _get(cells: Cells, load: str, c: int, target: str, key: str) -> float | None:
    cell = cells.get(load, {}).get(str(c), {}).get(target)
    if cell is None or cell.get("invalid"):
        return None
    value: float | None = cell.get(key)
    return value


def pick_reference(cells: Cells, candidates: list[str]) -> str | None:
    """The pass-through with the best geometric-mean throughput over the cells every candidate has."""
    shared: list[tuple[str, str]] = []
    for load, by_c in cells.items():
        for c in by_c:
            if all(_get(cells, load, int(c), t, "rps") for t in candidates):
                shared.append((load, c))
    if not candidates or not shared:
        return candidates[0] if candidates else None

    def score(t: str) -> float:
        return sum(math.log(_get(cells, ld, int(c), t, "rps") or 1.0) for ld, c in shared) / len(shared)

    return max(candidates, key=score)


def derived(cells: Cells, ref: str | None) -> dict[str, Any]:
    """FieldGuard against the reference pass-through (c) and nginx (b), and the audit's cost."""
    out: dict[str, Any] = {}
    for load, by_c in cells.items():
        for c in by_c:
            fg = _get(cells, load, int(c), FG, "rps")
            row: dict[str, Any] = {"fg_rps": fg, "fg_core0_util": _get(cells, load, int(c), FG, "server_util"),
                                   "fg_audit_batch": _get(cells, load, int(c), FG, "audit_batch"),
                                   "pass_core0_util": _get(cells, load, int(c), ref, "server_util") if ref else None}
            for name, other in (("vs_pass", ref), ("vs_nginx", "nginx"), ("vs_direct", "direct")):
                base = _get(cells, load, int(c), other, "rps") if other else None
                row[name] = fg / base if fg and base else None
            fg_p50, ref_p50 = _get(cells, load, int(c), FG, "p50_ms"), (
                _get(cells, load, int(c), ref, "p50_ms") if ref else None)
            row["added_p50_ms_vs_pass"] = fg_p50 - ref_p50 if fg_p50 is not None and ref_p50 is not None else None
            for name, other in (("audit_cost_vs_off", FG_OFF), ("audit_cost_vs_tmpfs", FG_TMPFS)):
                base = _get(cells, load, int(c), other, "rps")
                row[name] = 1 - fg / base if fg and base else None
            out.setdefault(load, {})[c] = row
    return out


def budget(cells: Cells, ref: str | None, d: dict[str, Any]) -> list[dict[str, Any]]:
    """The five budget lines (audit cost: one per load at c=64)."""
    lines: list[dict[str, Any]] = []

    def line(text: str, value: float | None, limit: float, higher_is_better: bool, unit: str,
             missing: str = "not measured") -> None:
        if value is None:
            lines.append({"verdict": "SKIP", "line": text, "value": None, "limit": limit, "note": missing})
            return
        ok = value >= limit if higher_is_better else value <= limit
        lines.append({"verdict": "PASS" if ok else "MISS", "line": text, "value": value, "limit": limit,
                      "note": f"{value:.2f}{unit} ({'>=' if higher_is_better else '<='} {limit}{unit})"})

    def at(load: str, c: int, key: str) -> float | None:
        value: float | None = d.get(load, {}).get(str(c), {}).get(key)
        return value

    line(f"one record c=64: fg throughput / pass-through (c) [{ref}]", at("record", 64, "vs_pass"), 0.60, True, "x")
    line(f"50-row list c=64: fg throughput / pass-through (c) [{ref}]", at("listing", 64, "vs_pass"), 0.30, True,
         "x")
    line("one record c=1: added p50 over (c)", at("record", 1, "added_p50_ms_vs_pass"), 0.3, False, " ms")
    line("50-row list c=1: added p50 over (c)", at("listing", 1, "added_p50_ms_vs_pass"), 1.0, False, " ms")
    off = any(FG_OFF in by_t for by_c in cells.values() for by_t in by_c.values())
    for load in cells:
        line(f"{load} c=64: durable audit's throughput cost vs audit off", at(load, 64, "audit_cost_vs_off"),
             0.10, False, "", "fg-noaudit (the same pipeline with `[audit] durable = false`) not measured in this run"
             if not off else "audit-off target not measured")
    return lines


def fmt_int(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}")


def table(cells: Cells, order: list[str], concurrencies: list[int], paths: dict[str, str]) -> str:
    """One block per load: req/s, p50/p99 ms and server CPU µs per request, per concurrency."""
    lines: list[str] = []
    for load, by_c in cells.items():
        lines.append(f"\n== {load}: {LOAD_TITLES.get(load, '')}\n   {paths.get(load, '')}")
        head = f"{'target':<15}" + "".join(f" | {'c=' + str(c):^33}" for c in concurrencies)
        sub = f"{'':<15}" + "".join(f" | {'req/s':>8} {'p50ms':>7} {'p99ms':>7} {'cpuµs':>7}" for _ in concurrencies)
        lines += [head, sub]
        for t in order:
            if not any(t in by_c.get(str(c), {}) for c in concurrencies):
                continue
            row = f"{t:<15}"
            for c in concurrencies:
                cell = by_c.get(str(c), {}).get(t)
                if cell is None:
                    row += f" | {'':>33}"
                elif cell.get("invalid"):
                    row += f" | {'errors':>33}"
                else:
                    row += (f" | {fmt_int(cell['rps']):>8} {fmt_ms(cell['p50_ms']):>7} {fmt_ms(cell['p99_ms']):>7} "
                            f"{fmt_int(cell['cpu_us']):>7}")
            lines.append(row)
    return "\n".join(lines)


def ratios_table(d: dict[str, Any], ref: str | None) -> str:
    lines = [f"\nFieldGuard (fg) against the pass-through reference (c) = {ref} and nginx (b):",
             f"{'load':<8} {'c':>3} {'fg req/s':>9} {'x (c)':>6} {'x (b)':>6} {'+p50 ms':>8} {'audit cost':>12} "
             f"{'fsync cost':>13} {'records':>8} {'core 0 busy: fg / (c)':>22}",
             f"{'':<8} {'':>3} {'':>9} {'':>6} {'':>6} {'':>8} {'(vs off)':>12} {'(disk/tmpfs)':>13} "
             f"{'/commit':>8}"]
    for load, by_c in d.items():
        for c, row in by_c.items():
            def r(key: str, pct: bool = False, row: dict[str, Any] = row) -> str:
                v = row.get(key)
                return "-" if v is None else (f"{v * 100:+.0f}%" if pct else f"{v:.2f}")
            lines.append(f"{load:<8} {c:>3} {fmt_int(row['fg_rps']):>9} {r('vs_pass'):>6} {r('vs_nginx'):>6} "
                         f"{r('added_p50_ms_vs_pass'):>8} {r('audit_cost_vs_off', True):>12} "
                         f"{r('audit_cost_vs_tmpfs', True):>13} {r('fg_audit_batch'):>8} "
                         f"{_pct(row['fg_core0_util']):>11} / "
                         f"{_pct(row['pass_core0_util']):<8}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def budget_text(lines: list[dict[str, Any]]) -> str:
    return "\n".join(["\nBudget:"] + [f"  {b['verdict']:<4}  {b['line']}: {b['note']}" for b in lines])
