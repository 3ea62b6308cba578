"""Evaluators: how well edits took and what they cost the model.

- `scoring`: batched target NLL, teacher-forced argmax and greedy answers (shared by all metrics);
- `counterfact` / `zsre`: edit benchmarks (ES / PS / NS / Score; token accuracy and locality);
- `probes`: held-out perplexity (on `editors.corpus`' held-out text), known-fact accuracy on the shipped probe set, retention of edits;
- `norms`: per-layer weight norm growth of the edited modules.
"""
