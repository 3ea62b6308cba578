"""The python checks of scripts/gpu_smoke.sh: each prints one `PASS name: ...` or `FAIL name: ...` line.

    python scripts/gpu_smoke.py agree --n 16                # values and deltas on CPU and CUDA within 1e-3 relative
    python scripts/gpu_smoke.py bench runs/bench.json       # every method ran on CUDA: quality, edits/s, peak memory

`agree` edits the same requests (read from a feed) on two devices with the same context prefixes, a fixed number
of value steps (no early stop, so both devices take the same path) and writes to the weights, then compares the
target values z and each layer's dense delta U V^T by relative Frobenius error. The functions take any device
pair and model, so the tests run them on the CPU twice with a tiny model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from editors.devices import synchronize  # noqa: E402
from editors.models import DEFAULT_MODEL, load_model  # noqa: E402
from editors.registry import hparams_for, make_editor  # noqa: E402
from editors.state import EditorState  # noqa: E402
from memory.record import FactRecord  # noqa: E402

FIXED_STEPS = {"stop": "nll", "nll_stop": 0.0, "max_steps": 8, "write": "weights"}  # same path on every device


def feed_requests(path: Path, n: int) -> list:
    """The first `n` facts of a kagent feed as edit requests."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    return [FactRecord.model_validate_json(line).to_request() for line in lines]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def edit_on(device: str, model_name: str, requests: list, templates: list[str] | None, overrides: dict):
    """(z, {layer: dense delta}, context templates) of one batch computed on `device` in fp32; `templates` (from
    the other device) are reused instead of sampled again, so both devices edit with the same prefixes."""
    lm = load_model(model_name, device, "float32")
    hp = hparams_for("encore", lm.model.config, **{**FIXED_STEPS, **overrides})
    state = EditorState(list(hp.layers), list(templates)) if templates else None
    editor = make_editor("encore", lm.model, lm.tok, hparams=hp, state=state)
    result = editor.compute(requests)
    synchronize(lm.model)
    return result.z, {d.layer: d.dense() for d in result.delta.layers}, editor.state.context_templates


def agree(requests: list, model_name: str = DEFAULT_MODEL, first: str = "cpu", second: str = "cuda",
          tol: float = 1e-3, overrides: dict | None = None) -> tuple[bool, str]:
    """Whether `first` and `second` give the same values and deltas for `requests` (within `tol`), and the line."""
    overrides = overrides or {}
    z1, d1, templates = edit_on(first, model_name, requests, None, overrides)
    z2, d2, _ = edit_on(second, model_name, requests, templates, overrides)
    errs = {"values": relative(z2, z1)} | {f"delta L{layer}": relative(d2[layer], d) for layer, d in d1.items()}
    worst = max(errs, key=errs.get)
    ok = errs[worst] <= tol and d1.keys() == d2.keys()
    detail = f"{len(requests)} edits {first} vs {second}: worst {worst} {errs[worst]:.2e} (tolerance {tol:g})"
    return ok, f"{'PASS' if ok else 'FAIL'} agree: {detail}"


def bench_lines(rows: list[dict], methods: list[str], device: str = "cuda") -> list[str]:
    """One line per method of a `kagent bench --json` file: ran on `device`, finite quality, speed and memory."""
    by = {r["method"]: r for r in rows}
    out = []
    for m in methods:
        r = by.get(m)
        if r is None:
            out.append(f"FAIL bench {m}: no row in the results")
            continue
        ok = str(r.get("device", "")).startswith(device) and 0.0 <= r["es"] <= 1.0 and r["edits_per_second"] > 0
        mem = r.get("peak_gpu_mb")
        out.append(f"{'PASS' if ok else 'FAIL'} bench {m}: es {r['es']:.3f}, ns {r['ns']:.3f} on {r.get('device')} "
                   f"{r.get('dtype')}, {r['edits_per_second']:.2f} edits/s, peak GPU "
                   f"{'n/a' if mem is None else f'{mem:.0f} MiB'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_smoke.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="check", required=True)
    a = sub.add_parser("agree", help="CPU and CUDA agree on values and deltas")
    a.add_argument("--n", type=int, default=16)
    a.add_argument("--facts", type=Path, default=ROOT / "examples" / "feed.jsonl")
    a.add_argument("--model", default=DEFAULT_MODEL)
    a.add_argument("--tol", type=float, default=1e-3)
    b = sub.add_parser("bench", help="a kagent bench --json file ran every method on CUDA")
    b.add_argument("json", type=Path)
    b.add_argument("--methods", default="encore,memit,alphaedit")
    args = ap.parse_args(argv)
    if args.check == "agree":
        ok, line = agree(feed_requests(args.facts, args.n), args.model, tol=args.tol)
        print(line)
        return 0 if ok else 1
    lines = bench_lines(json.loads(args.json.read_text()), args.methods.split(","))
    print("\n".join(lines))
    return 0 if all(line.startswith("PASS") for line in lines) else 1


if __name__ == "__main__":
    raise SystemExit(main())
