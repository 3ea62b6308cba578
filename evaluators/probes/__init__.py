"""Probes: what the model still answers and what an edit cost it, read after every batch and by the benchmarks.

- `facts`: the shipped probe sets (known facts, the guard's probe facts) and the benchmark records they reserve;
- `answers`: known-fact accuracy and retention of applied edits (greedy answers), and asking again only what a
  change can have touched;
- `damage`: answer margins of the probe facts, the damage measure and its noise floor (random updates of a batch's
  size);
- `perplexity`: held-out perplexity over strided windows;
- `suite`: `ProbeSuite`, the fixed inputs every batch is measured on, and its `Reading` of one model state;
- `same_subject`: the guard's same-subject check (an edited subject's other answers before and after its batch).

They score through evaluators/scoring.py (batched teacher-forced scores, greedy answers), the primitive the
benchmarks' metrics share. The agent calls these; it measures nothing itself.
"""
