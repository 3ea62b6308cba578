"""scripts/gpu_smoke.sh cannot run without a GPU; its shell is syntax-checked and its python checks run on the CPU
(the same device twice, a tiny model)."""
from __future__ import annotations

import subprocess

from conftest import SCRIPTS, load_script, make_tiny_llama, one_thread, toy_tokenizer

ROOT = SCRIPTS.parent


def test_the_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_smoke.sh")]).returncode == 0


def test_agree_passes_for_the_same_device_twice(tmp_path):
    smoke = load_script("gpu_smoke")
    tok = toy_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    requests = smoke.feed_requests(ROOT / "examples" / "feed.jsonl", 2)
    fast = {"layers": [1, 2], "stats_tokens": 2000, "n_context": 1, "context_tokens": 3, "max_steps": 3}
    with one_thread():
        ok, line = smoke.agree(requests, str(tmp_path), "cpu", "cpu", overrides=fast)
    assert ok and line.startswith("PASS agree: 2 edits cpu vs cpu")


def test_bench_lines_need_a_cuda_row_per_method():
    smoke = load_script("gpu_smoke")
    row = {"method": "encore", "es": 0.9, "ns": 0.8, "edits_per_second": 3.0, "device": "cuda:0", "dtype": "bfloat16",
           "peak_gpu_mb": 2048.0}
    lines = smoke.bench_lines([row, row | {"method": "memit", "device": "cpu"}], ["encore", "memit", "alphaedit"])
    assert lines[0] == "PASS bench encore: es 0.900, ns 0.800 on cuda:0 bfloat16, 3.00 edits/s, peak GPU 2048 MiB"
    assert lines[1].startswith("FAIL bench memit") and lines[2] == "FAIL bench alphaedit: no row in the results"
