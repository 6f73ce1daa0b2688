"""Projection (issue 22 §4): hours and bytes to dump a 7B and a 70B teacher over 100M and 1B tokens, on 1 and 8 H200s,
at the default store (causal LM: top-6 + rest at the default temperatures), from measured rates.

- Bytes per token: measured, kdcache's real writer at the default store (`bench.ceiling`'s top-6 cases: 32k vocabulary
  for the 7B, 128k for the 70B), taken from the ceiling section's saved result.
- Forward tokens/s on an H200: the GPU profile's measured 7B-shape rate when its JSON is there (``--gpu-results``, by
  default the committed H200 run in bench/measured/h200-2026-12-04, or the folder `python -m bench.gpu` writes:
  ``llama-7b.json`` or ``results.json``'s ``parts.llama-7b``, with ``forward_tokens_per_s`` and ``forward_mfu``); otherwise
  2 x parameters FLOP per token at 50% of the dense bf16 peak (assumed). The 70B is always extrapolated: the 7B's MFU
  (measured or assumed) at 2 x 70.6B FLOP per token.
- The dump's rate per GPU is the lower of that forward rate and the host ceiling the ceiling section measured on this
  CPU (each rank has its own writer thread); 8 GPUs: 8 ranks of `torchrun`, each dumping every 8th shard, scaling
  assumed linear (not measured).

    python -m bench.projection                                  # rewrites the table in docs/scale.md (H200 figures)
    python -m bench.projection --gpu-results bench/results/gpu-profile --print
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from bench import ceiling, common

DOC = common.REPO / "docs" / "scale.md"
START, END = "<!-- projection: written by python -m bench.projection -->", "<!-- projection end -->"
# The GPU profile's figures from the H200 run (committed; `--gpu-results bench/results/gpu-profile` reads a fresh run).
GPU_RESULTS = common.REPO / "bench" / "measured" / "h200-2026-12-04"
CEILING = common.RESULTS / "cpu" / "ceiling.json"  # the ceiling section's latest result (python -m bench.run --only ceiling)
H200_GIB = 139.0  # usable GPU memory of one H200 as the device reports it

# The teachers projected: parameters, the ceiling case whose bytes per token is theirs (same vocabulary at the default store).
TEACHERS = {
    "7B": {"label": "Llama-2-7B shape (6.74B, 32k vocabulary)", "parameters": 6.738e9, "case": "topk6-32k"},
    "70B": {"label": "Llama-3-70B shape (70.6B, 128k vocabulary)", "parameters": 70.55e9, "case": "topk6-128k"},
}
TOKENS = (100e6, 1e9)
GPUS = (1, 8)


def gpu_rates(results: Optional[Path], peak_tflops: float = common.PEAK_TFLOPS["H200"]) -> dict[str, dict[str, Any]]:
    """Each teacher's forward tokens/s on one H200, with where it came from."""
    measured, figures = None, None
    path = results / "llama-7b.json" if results else None  # the H200 run's layout (one JSON per part)
    if path is not None and path.exists():
        figures = json.loads(path.read_text())
    elif results is not None and (results / "results.json").exists():  # bench.gpu's layout now: every part in one file
        path = results / "results.json"
        figures = (json.loads(path.read_text()).get("parts") or {}).get("llama-7b")
    if figures and figures.get("forward_tokens_per_s") and figures.get("forward_mfu"):
        measured = figures
    mfu = float(measured["forward_mfu"]) if measured else ceiling.MFU
    out = {}
    for name, t in TEACHERS.items():
        if name == "7B" and measured:
            where = path.relative_to(common.REPO) if path.is_relative_to(common.REPO) else path
            rate = float(measured.get("forward_reduce_tokens_per_s") or measured["forward_tokens_per_s"])
            how = (f"measured on an H200 ({where}): the forward with the dump's on-device top-6 reduction and its copy to "
                   f"the host; the bare forward {float(measured['forward_tokens_per_s']):,.0f} tokens/s, MFU {mfu:.1%}")
        else:
            rate = mfu * peak_tflops * 1e12 / (2.0 * t["parameters"])
            how = (f"extrapolated: the 7B's measured MFU ({mfu:.0%})" if measured else f"assumed: {mfu:.0%} MFU") + \
                f" of {peak_tflops:.0f} TFLOP/s at 2 x {t['parameters'] / 1e9:.2f}B FLOP/token"
        out[name] = {"forward_tokens_per_s": rate, "how": how, "measured": name == "7B" and measured is not None, "mfu": mfu,
                     "weights_gib": t["parameters"] * 2 / 2**30}
    return out


def project(ceiling_result: dict[str, Any], rates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (teacher, tokens, GPUs): hours, bytes, and what bounds the rate."""
    cases = {c["name"]: c for c in ceiling_result["cases"]}
    rows = []
    for name, t in TEACHERS.items():
        case = cases[t["case"]]
        host = case["host"]["cpu"]["tokens_per_s"]  # this CPU's host ceiling per rank
        fwd = rates[name]["forward_tokens_per_s"]
        per_gpu = min(fwd, host)
        for tokens in TOKENS:
            for gpus in GPUS:
                rows.append({"teacher": name, "tokens": tokens, "gpus": gpus, "bytes_per_token": case["bytes_per_token"],
                             "bytes": tokens * case["bytes_per_token"], "tokens_per_s": per_gpu * gpus,
                             "hours": tokens / (per_gpu * gpus) / 3600, "bound": "teacher forward" if fwd <= host else "host",
                             "fits_one_gpu": rates[name]["weights_gib"] < H200_GIB})
    return rows


def markdown(ceiling_result: dict[str, Any], rates: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    cases = {c["name"]: c for c in ceiling_result["cases"]}
    L = [START, "", "| teacher | tokens | H200s | dump hours | cache bytes | bytes/token | tokens/s | bound by |",
         "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        L.append(f"| {r['teacher']} | {r['tokens'] / 1e6:,.0f}M | {r['gpus']} | {r['hours']:,.2f} (extrapolated) | "
                 f"{_size(r['bytes'])} (extrapolated) | {r['bytes_per_token']:.1f} (measured) | {r['tokens_per_s']:,.0f} | {r['bound']} |")
    L += ["", "Where each figure comes from:", ""]
    for name, t in TEACHERS.items():
        rate, case = rates[name], cases[t["case"]]
        L.append(f"- **{name}**, {t['label']}: forward {rate['forward_tokens_per_s']:,.0f} tokens/s per H200, {rate['how']}; "
                 f"bytes per token {case['bytes_per_token']:.1f}, measured: kdcache's writer at the default store "
                 f"({case['label']}, index and character offsets included) over {case['tokens']:,} tokens; host ceiling "
                 f"{case['host']['cpu']['tokens_per_s']:,.0f} tokens/s per rank, measured on this CPU (section 10 of "
                 f"BENCHMARKS.md). bf16 weights {rate['weights_gib']:.0f} GiB of an H200's {H200_GIB:.0f} GiB"
                 + ("." if rate["weights_gib"] < H200_GIB - 16 else
                    f": {H200_GIB - rate['weights_gib']:.0f} GiB left for activations and the logits (a batch of at most a "
                    "few thousand tokens per forward pass), so one H200 holds it only just; kdcache loads the whole teacher "
                    "on each rank (no tensor parallelism), so each of the 8 H200s holds a full copy."))
    L += ["- Hours = tokens / (GPUs x the lower of the forward rate and the host ceiling); 8 GPUs scale linearly (8 ranks "
          "of `torchrun`, each dumping every 8th shard; not measured). Loading, hashing and tokenizing are left out (minutes, "
          "once per dump). The 7B rate has the dump's device work and copies in it but not its writer: the full dump loop of the "
          "1B Llama on the H200 ran at 1.37x its bare forward (BENCHMARKS.md section 12), so these hours are a lower bound.",
          "", END]
    return "\n".join(L)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.projection", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-results", type=Path, default=GPU_RESULTS, help="the GPU profile's folder (python -m bench.gpu --results)")
    p.add_argument("--ceiling", type=Path, default=CEILING, help="the ceiling section's saved result")
    p.add_argument("--doc", type=Path, default=DOC, help="the Markdown file whose projection table is rewritten")
    p.add_argument("--print", action="store_true", help="print the table, change no file")
    args = p.parse_args(argv)
    if not args.ceiling.exists():
        print(f"no ceiling result at {args.ceiling}: run `python -m bench.run --only ceiling` first, or pass --ceiling", file=sys.stderr)
        return 2
    result = json.loads(args.ceiling.read_text())["result"]
    rates = gpu_rates(args.gpu_results)
    text = markdown(result, rates, project(result, rates))
    if args.print:
        print(text)
        return 0
    doc = args.doc.read_text()
    if START not in doc or END not in doc:
        print(f"{args.doc} has no projection table to rewrite (the lines {START!r} and {END!r}): add them where it goes",
              file=sys.stderr)
        return 2
    head, rest = doc.split(START, 1)
    args.doc.write_text(head + text + rest.split(END, 1)[1])
    print(text)
    print(f"wrote the projection table in {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
