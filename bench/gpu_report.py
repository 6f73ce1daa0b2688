"""BENCHMARKS.md's GPU section and summary rows (issue 22), rendered from a GPU profile run's files.

Reads the folder `python -m bench.gpu --results DIR` wrote (by default the committed H200 run,
bench/measured/h200-2026-12-04): results.json (or one JSON per part, as that run wrote), or, for a part
whose figures did not come back from the device, its `[gpu PART] key=value` lines in console.log.

    python -m bench.gpu_report [--results DIR]      # prints the section
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

from bench import common

MEASURED = common.REPO / "bench" / "measured" / "h200-2026-12-04"
GOALS = {"dump": 1.05, "mfu_bert": 0.45, "mfu_llama": 0.50, "step": 1.05}
_LINE = re.compile(r"^\[gpu (?P<part>[\w-]+)\] (?P<rest>.*)$")


def load(results: Path) -> dict[str, dict[str, Any]]:
    """Each part's figures: its JSON when there, else what console.log's lines for it say (steps: ratios, plain s/step)."""
    parts: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        figures = json.loads(path.read_text())
        if path.name == "results.json":  # bench.gpu's layout now: every part in one file
            parts.update({k: v for k, v in (figures.get("parts") or {}).items() if v})
        elif isinstance(figures, dict) and "part" in figures:  # one JSON per part (the H200 run of 2026-12-04)
            parts[figures["part"]] = figures
    log = results / "console.log"
    for line in (log.read_text().splitlines() if log.exists() else []):
        m = _LINE.match(line)
        if not m or m["part"] in parts and "from_log" not in parts[m["part"]]:
            continue
        fig = parts.setdefault(m["part"], {"part": m["part"], "from_log": True})
        ratios = re.search(r"ratios=(\{[^}]*\})", m["rest"])
        if ratios:
            fig["ratios"] = json.loads(ratios[1])
        plain = re.search(r'median_step_s=\{"plain": ([0-9.eE+-]+)', m["rest"])
        if plain:
            fig["plain_step_s"] = float(plain[1])
        rounds = re.search(r"rounds_done=(\d+)", m["rest"])
        if rounds:
            fig["rounds_done"] = int(rounds[1])
        status = re.search(r'status="([^"]*)"', m["rest"])
        if status:
            fig["status"] = status[1]
    return parts


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary_rows(parts: dict[str, dict[str, Any]]) -> list[str]:
    """Rows for the summary table: the issue's GPU goals, met or missed (each row names the device it ran on)."""
    L = []
    dev = next((str(p["device"]).replace("NVIDIA ", "") for p in parts.values() if p.get("device")), "GPU")
    for name, goal in (("bert-large", GOALS["mfu_bert"]), ("llama-1b", GOALS["mfu_llama"]), ("llama-7b", GOALS["mfu_llama"])):
        p = parts.get(name)
        if p and p.get("forward_mfu"):
            L.append(f"| {dev} {name}: bare forward MFU (bf16) | {p['forward_mfu']:.3f} | >= {goal:.2f} | "
                     f"{_verdict(p['forward_mfu'] >= goal)} |")
    for name in ("bert-large", "llama-1b"):
        p = parts.get(name)
        if p and p.get("dump_loop_over_forward"):
            L.append(f"| {dev} {name}: dump forward-and-write loop / bare forward | {p['dump_loop_over_forward']:.3f} | "
                     f"<= {GOALS['dump']} | {_verdict(p['dump_loop_over_forward'] <= GOALS['dump'])} |")
            L.append(f"| {dev} {name}: dump wall (hash, load, tokenize included) / bare forward | "
                     f"{p['dump_wall_over_forward']:.3f} | | |")
    p = parts.get("llama-7b")
    if p and p.get("forward_reduce_over_forward"):
        L.append(f"| {dev} llama-7b: forward + top-6 reduction + host copy / bare forward | {p['forward_reduce_over_forward']:.3f} "
                 f"| <= {GOALS['dump']} | {_verdict(p['forward_reduce_over_forward'] <= GOALS['dump'])} |")
    for name in ("steps-seq2seq", "steps-lm"):
        r = parts.get(name, {}).get("ratios")
        for kind in ("offline-topk", "offline-sampled"):
            if r and kind in r:
                L.append(f"| {dev} {name}: {kind} step / plain | {r[kind]:.3f} | <= {GOALS['step']} | "
                         f"{_verdict(r[kind] <= GOALS['step'])} |")
    return L


def markdown(parts: dict[str, dict[str, Any]], results: Path) -> list[str]:
    """The GPU section: what ran, the dump's figures per teacher, the step costs."""
    if not parts:
        return []
    where = results.relative_to(common.REPO) if results.is_relative_to(common.REPO) else results
    device = next((p["device"] for p in parts.values() if p.get("device")), "the GPU")
    L = ["## 12. Stage one on a GPU (the GPU profile)", "",
         f"`python -m bench.run --profile gpu --results DIR` (bench/gpu.py, docs/gpu.md), one run on an {device} (bf16, "
         f"random weights built on the device, SDPA attention). Files: `{where}/` (the steps parts' figures from its "
         "console.log). MFU against 989 TFLOP/s, the H200's dense bf16 peak.", ""]
    hc = parts.get("host-copies")
    if hc and hc.get("checked"):
        same = all(c.get("identical") for c in hc["checked"].values())
        L += [f"Asynchronous pinned device-to-host copies against synchronous `.cpu()` copies, {len(hc['checked'])} store modes "
              f"({', '.join(hc['checked'])}): {'byte-identical in every mode' if same else '**not identical**'}.", ""]
    L += ["| teacher | tokens dumped | bare forward tokens/s | MFU | dump loop tokens/s | loop / forward | dump wall s | "
          "hash s | load + tokenize s | forward + write s | bytes/token | cache |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("bert-large", "llama-1b"):
        p = parts.get(name)
        if not p or "dump_s" not in p:
            continue
        ph = p["dump_phases_s"]
        note = f" (cap lowered it from {p['target_tokens'] / 1e6:.0f}M)" if p.get("lowered_by") else ""
        L.append(f"| {name} | {p['dump_tokens']:,}{note} | {p['forward_tokens_per_s']:,.0f} | {p['forward_mfu']:.3f} | "
                 f"{p['dump_loop_tokens_per_s']:,.0f} | {p['dump_loop_over_forward']:.2f} | {p['dump_s']:.1f} | {ph['hash']:.1f} | "
                 f"{ph['load_tokenize']:.1f} | {ph['forward_write']:.1f} | {p['cache_bytes_per_token']:,.1f} | "
                 f"{p['cache_bytes'] / 1e9:.2f} GB |")
    p = parts.get("llama-7b")
    if p and p.get("forward_tokens_per_s"):
        L += ["", f"7B-class Llama shape ({p['shape']['layers']} x {p['shape']['hidden']}, {p['shape']['vocab']:,} vocabulary, "
              f"{p['parameters'] / 1e9:.2f}B parameters, batch {p['shape']['batch']} x {p['shape']['max_length']}): bare forward "
              f"{p['forward_tokens_per_s']:,.0f} tokens/s over {p['forward_tokens']:,} tokens, MFU {p['forward_mfu']:.3f}; with the "
              f"dump's on-device top-6 + rest reduction and its asynchronous copy to the host {p['forward_reduce_tokens_per_s']:,.0f} "
              f"tokens/s, {p['forward_reduce_over_forward']:.3f}x the forward; peak GPU memory "
              f"{p['gpu_peak_bytes'] / 2**30:.1f} GiB. No writer ran in this part."]
    steps = [(n, parts[n]) for n in ("steps-seq2seq", "steps-lm") if parts.get(n, {}).get("ratios")]
    if steps:
        L += ["", "Step cost on the GPU, median s/step over interleaved rounds (the rounds done before the part's cap):", "",
              "| student | rounds | plain s/step | offline top-k / plain | offline sampled / plain | online / plain |",
              "|---|---:|---:|---:|---:|---:|"]
        label = {"steps-seq2seq": "T5, 30,522 vocabulary", "steps-lm": "GPT-2 shape, 8,000 vocabulary"}
        for n, s in steps:
            r = s["ratios"]
            L.append(f"| {n} ({label.get(n, n)}) | {s.get('rounds_done', '?')} | {s.get('plain_step_s', float('nan')):.4f} | "
                     f"{r.get('offline-topk', float('nan')):.3f} | {r.get('offline-sampled', float('nan')):.3f} | "
                     f"{r.get('online', float('nan')):.3f} |")
    L += ["", "Reading it: the 7B shape's forward misses the MFU goal by a hair (0.498 for 0.50), and the dump's on-device "
          "reduction and copy cost it 2.5%, within the dump goal; the smaller teachers' forwards miss it by more (at "
          "sequence 128 and 1B parameters the kernels are too small to fill the chip). The dump loop misses its goal for "
          "both teachers that ran it whole; this run does not split the loop's time between the GPU, the forward loop's "
          "host work and the writer (bert-large's loop stored 2 KiB per token, 0.52 GB/s; the 1B Llama's 44 bytes). "
          "The fixed costs are about half of each dump's wall, most of it tokenizing on one thread. One round of "
          "steps only: each step ratio is one median. docs/gpu.md says what each miss comes from and what was done.", ""]
    return L


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=MEASURED, help="a GPU profile run's folder")
    args = p.parse_args(argv)
    parts = load(args.results)
    if not parts:
        print(f"no GPU profile figures in {args.results}: pass the folder `python -m bench.gpu --results` wrote", file=sys.stderr)
        return 2
    print("\n".join(summary_rows(parts) + [""] + markdown(parts, args.results.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
