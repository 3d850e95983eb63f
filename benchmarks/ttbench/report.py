"""The tables, the ratios and the JSON summary of a run.

The tables always have the floor, tt and peft columns ("-" where a setup did
not run). Any other setup adds its own columns after those: its ratio to the
floor (train step), its memory (before the RSS columns of ``--memory rss``),
its inference time and ratio to the base model when it infers, its checkpoint
bytes and row copies when it saves one.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ttbench.shapes import INFERENCE_TOKENS

COMPARED = ("floor", "tt", "peft")  # the columns every table has


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.3f}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the head, its rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    return ["", title, "", *markdown_table(head, rows)]


def _others(groups: Iterable[Iterable[str]], known: tuple[str, ...]) -> list[str]:
    """Names beyond ``known``, in the order they first appear."""
    found: list[str] = []
    for group in groups:
        found += [name for name in group if name not in known and name not in found]
    return found


def train_ratios(result: dict[str, Any]) -> str:
    """The one-line summary printed after each shape (and each setup over its PEFT twin, where both ran)."""
    t = {name: v["train"]["median_s"] for name, v in result["setups"].items()}
    line = f"train tt/floor {_ratio(t.get('tt'), t['floor'])}, peft/floor {_ratio(t.get('peft'), t['floor'])}"
    for name, entry in result["setups"].items():
        twin = entry.get("versus")
        if twin in t:
            line += f", {name}/{twin} {_ratio(t[name], t[twin])}"
    return line


def _train_table(results: list[dict[str, Any]]) -> list[str]:
    others = _others([r["setups"] for r in results], COMPARED)
    rows = []
    for r in results:
        wall = {name: v["train"]["median_s"] for name, v in r["setups"].items()}
        # tt/floor within each round: how far machine noise moves the ratio.
        floor_s = r["setups"]["floor"]["train"]["wall_s"]
        tt_s = r["setups"]["tt"]["train"]["wall_s"] if "tt" in r["setups"] else None
        per_round = min_min = "-"
        if tt_s is not None:
            pairs = [t / f for t, f in zip(tt_s, floor_s, strict=True)]
            per_round, min_min = f"{min(pairs):.2f}-{max(pairs):.2f}", _ratio(min(tt_s), min(floor_s))
        row = [r["shape"], *("-" if name not in wall else f"{wall[name]:.3f}" for name in COMPARED)]
        row += [_ratio(wall.get("tt"), wall["floor"]), per_round, min_min]
        row += [_ratio(wall.get("peft"), wall["floor"]), _ratio(wall.get("tt"), wall.get("peft"))]
        row += [_ratio(wall.get(name), wall["floor"]) for name in others]
        rows.append(row)
    head = ["shape", "floor s", "tt s", "peft s", "tt/floor", "per round", "min/min", "peft/floor", "tt/peft"]
    head += [f"{name}/floor" for name in others]
    title = (
        "Train step (median wall time; per round: tt/floor within each round; min/min: fastest over fastest)"
    )
    return _table(title, head, rows)


def _memory_table(results: list[dict[str, Any]]) -> list[str]:
    others = _others([r["setups"] for r in results], COMPARED)
    have_rss = any("rss_peak_bytes" in v for r in results for v in r["setups"].values())
    rows = []
    for r in results:
        memory = {name: v["memory_bytes"] for name, v in r["setups"].items()}
        row = [r["shape"], *(_mib(memory.get(name)) for name in COMPARED)]
        row += [_ratio(memory.get("tt"), memory["floor"]), _ratio(memory.get("peft"), memory["floor"])]
        row += [_mib(memory.get(name)) for name in others]
        if have_rss:
            rss = [r["setups"].get(name, {}).get("rss_peak_bytes") for name in COMPARED]
            row += [" / ".join(_mib(value) for value in rss), _ratio(rss[1], rss[0])]
        rows.append(row)
    head = ["shape", "floor MiB", "tt MiB", "peft MiB", "tt/floor", "peft/floor"]
    head += [f"{name} MiB" for name in others]
    head += ["RSS floor / tt / peft MiB", "RSS tt/floor"] if have_rss else []
    title = "Training memory over the built model (adapter tensors + peak of the first step)"
    return _table(title, head, rows)


def _inference_table(results: list[dict[str, Any]]) -> list[str]:
    others = _others([r["inference"] for r in results], ("base", "tt", "peft"))
    rows = []
    for r in results:
        i = {name: v["median_s"] for name, v in r["inference"].items()}
        row = [
            r["shape"],
            *("-" if name not in i else f"{1e3 * i[name]:.1f}" for name in ("base", "tt", "peft")),
        ]
        row += [_ratio(i.get("tt"), i["base"]), _ratio(i.get("peft"), i["base"])]
        row += [_ratio(i.get("tt"), i.get("peft"))]
        for name in others:
            row += ["-" if name not in i else f"{1e3 * i[name]:.1f}", _ratio(i.get(name), i["base"])]
        rows.append(row)
    head = ["shape", "base ms", "tt ms", "peft ms", "tt/base", "peft/base", "tt/peft"]
    for name in others:
        head += [f"{name} ms", f"{name}/base"]
    return _table(f"Unmerged inference, 1 x {INFERENCE_TOKENS} tokens (median wall time)", head, rows)


def _checkpoint_table(results: list[dict[str, Any]]) -> list[str]:
    saving = [
        [name for name, v in r["setups"].items() if v.get("checkpoint_bytes") is not None] for r in results
    ]
    names = ["tt", "peft", *_others(saving, COMPARED)]
    rows = []
    for r in results:
        expected = r["expected_checkpoint_data_bytes"]
        entries = [r["setups"].get(name, {}) for name in names]
        sizes = [entry.get("checkpoint_bytes") for entry in entries]
        data = [entry.get("checkpoint_data_bytes") for entry in entries]
        cells = [
            ("-" if size is None else str(size), "-" if value is None else f"{value / expected:g}")
            for size, value in zip(sizes, data, strict=True)
        ]
        row = [r["shape"], str(expected), cells[0][0], cells[1][0], cells[0][1], cells[1][1]]
        row += [cell for pair in cells[2:] for cell in pair]
        rows.append(row)
    head = ["shape", "k x d x 4", "tt file bytes", "peft file bytes", "tt row copies", "peft row copies"]
    for name in names[2:]:
        head += [f"{name} file bytes", f"{name} row copies"]
    return _table("Checkpoint weight files", head, rows)


def _round_ratios(numerator: dict[str, Any], denominator: dict[str, Any], key: str = "wall_s") -> list[float]:
    return [n / d for n, d in zip(numerator[key], denominator[key], strict=True)]


def _fastest(numerator: dict[str, Any], denominator: dict[str, Any], key: str) -> str:
    return _ratio(min(numerator[key]), min(denominator[key]))


def _stack_table(results: list[dict[str, Any]]) -> list[str]:
    """Each setup beyond floor/tt/peft against the floor, the setup less its tokens, and the base model.

    Wall and process CPU time (one thread: CPU time leaves out the time the
    process waited for a core, which on a shared machine is most of the noise).
    """
    rows = []
    for r in results:
        setups = r["setups"]
        floor = setups["floor"]
        for name, entry in setups.items():
            if name in COMPARED:
                continue
            train, floor_train = entry["train"], floor["train"]
            row = [r["shape"], name, _ratio(train["median_s"], floor_train["median_s"])]
            row += [_fastest(train, floor_train, "wall_s")]
            if "cpu_s" in train:
                cpu = _round_ratios(train, floor_train, "cpu_s")
                row += [f"{statistics.median(cpu):.3f}", _fastest(train, floor_train, "cpu_s")]
            else:
                row += ["-", "-"]
            without = entry.get("without_tokens")
            if without in setups and "cpu_s" in train:
                pairs = _round_ratios(train, setups[without]["train"], "cpu_s")
                fastest = _fastest(train, setups[without]["train"], "cpu_s")
                row += [f"{without}: {statistics.median(pairs):.3f} / {fastest}"]
            else:
                row += ["-"]
            extra = entry["memory_bytes"] - floor["memory_bytes"] - 4 * entry.get("trainable_bytes", 0)
            row += [f"{100 * extra / floor['memory_bytes']:+.1f}%"]
            inference = r.get("inference", {})
            if name in inference:
                timing, base = inference[name], inference["base"]
                row += [_ratio(timing["median_s"], base["median_s"])]
                row += [
                    _ratio(timing["median_cpu_s"], base["median_cpu_s"]) if "median_cpu_s" in timing else "-"
                ]
            else:
                row += ["-", "-"]
            paired = r.get("inference_paired", {}).get(name)
            row += [f"{paired['median_cpu_ratio']:.3f} ({len(paired['cpu_ratios'])})" if paired else "-"]
            rows.append(row)
    if not rows:
        return []
    head = [
        "shape",
        "setup",
        "wall median",
        "wall min/min",
        "CPU per-round median",
        "CPU min/min",
        "CPU over the stack less its tokens (per-round median / min/min)",
        "memory beyond floor + 4 x trainable",
        "inference/base wall",
        "inference/base CPU",
        "inference/base CPU, paired (pairs)",
    ]
    title = (
        "Stacks (train step over the floor, in wall and process CPU time; memory: beyond the floor's, less "
        "the trainable parameters, their gradients and AdamW's two states, in % of the floor's; "
        "inference: medians over the base model's; paired: median of back-to-back ratios, --paired-seconds)"
    )
    return _table(title, head, rows)


def _versus_table(results: list[dict[str, Any]]) -> list[str]:
    """Each setup beside its twin (``versus``: the same adapter built with PEFT), where both ran.

    Ratios are the setup's over its twin's: train step (wall median, process
    CPU per-round median and fastest over fastest), training memory, unmerged
    inference (CPU median), checkpoint weight bytes.
    """
    rows = []
    for r in results:
        setups, inference = r["setups"], r.get("inference", {})
        for name, entry in setups.items():
            twin = entry.get("versus")
            if twin not in setups:
                continue
            other = setups[twin]
            train, twin_train = entry["train"], other["train"]
            row = [r["shape"], f"{name} / {twin}", _ratio(train["median_s"], twin_train["median_s"])]
            cpu = _round_ratios(train, twin_train, "cpu_s")
            row += [f"{statistics.median(cpu):.3f}", _fastest(train, twin_train, "cpu_s")]
            row += [f"{_mib(entry['memory_bytes'])} / {_mib(other['memory_bytes'])}"]
            row += [_ratio(entry["memory_bytes"], other["memory_bytes"])]
            row += [f"{_mib(entry['trainable_bytes'])} / {_mib(other['trainable_bytes'])}"]
            if name in inference and twin in inference:
                base = inference["base"]["median_cpu_s"]
                mine, theirs = inference[name]["median_cpu_s"], inference[twin]["median_cpu_s"]
                row += [f"{_ratio(mine, base)} / {_ratio(theirs, base)}", _ratio(mine, theirs)]
            else:
                row += ["-", "-"]
            sizes = [entry.get("checkpoint_bytes"), other.get("checkpoint_bytes")]
            row += [" / ".join("-" if size is None else str(size) for size in sizes)]
            rows.append(row)
    if not rows:
        return []
    head = [
        "shape",
        "setup / PEFT's",
        "train wall median",
        "train CPU per-round median",
        "train CPU min/min",
        "memory MiB",
        "memory",
        "trainable MiB",
        "inference/base CPU",
        "inference CPU",
        "checkpoint bytes",
    ]
    title = (
        "Side by side with PEFT (the setup over PEFT's doing the same, measured in the same rounds; "
        "memory: adapter tensors + peak of the first step)"
    )
    return _table(title, head, rows)


def _profile_lines(results: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for r in results:
        if "profile" not in r:
            continue
        for phase, reference in (("train", "floor"), ("inference", "base")):
            found = r["profile"][phase]
            lines += ["", f"Profile, {r['shape']}, {phase}: self CPU ms per call beyond {reference}"]
            for name, entry in found.items():
                if name == reference:
                    continue
                lines.append(
                    f"  {name}: {1e3 * entry['own_ops_s']:.2f} ms in ops the {reference} does not run; "
                    f"all ops {1e3 * entry['total_s']:.1f} ms vs {1e3 * found[reference]['total_s']:.1f} ms"
                )
                lines += [f"    {1e3 * seconds:+9.3f}  {op[:110]}" for op, seconds in entry["extra_ops"]]
    return lines


def report(results: list[dict[str, Any]]) -> str:
    """All tables of a run's per-shape results (and the profiles, where measured)."""
    where = list(dict.fromkeys(f"{r['device']}, {r['dtype']}" for r in results if "device" in r))
    lines = [f"Measured on: {'; '.join(where)}"] if where else []
    lines += _train_table(results)
    lines += _memory_table(results)
    lines += _inference_table(results)
    lines += _checkpoint_table(results)
    lines += _stack_table(results)
    lines += _versus_table(results)
    lines += _profile_lines(results)
    return "\n".join(lines)


def summary(
    machine: dict[str, Any],
    command: str,
    wall_s: float,
    load_end: str,
    process_peak_rss_bytes: int,
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """What ``--json`` writes."""
    return {
        "machine": machine,
        "command": command,
        "wall_s": wall_s,
        "load_end": load_end,
        "process_peak_rss_bytes": process_peak_rss_bytes,
        "results": results,
    }


def write_json(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=1))


def read_results(path: Path) -> list[dict[str, Any]]:
    """The per-shape results of a saved ``--json`` run."""
    return json.loads(path.read_text())["results"]
