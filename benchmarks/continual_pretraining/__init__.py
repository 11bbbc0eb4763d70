"""Experiment 2 of the evidence benchmarks: real continual pre-training, forgetting against learning.

A causal LM (by default the bundled SmolLM2-135M-Instruct, an English model) is trained further on text of a new
language (by default the bundled Spanish Wikipedia summaries) with each compared method (``benchmarks/methods.py``),
and measured on held-out text:

- learning: perplexity of held-out new-language text;
- forgetting, three ways (``measures.py``): (a) perplexity of held-out old-language text; (b) drift, the mean
  KL divergence ``KL(base || adapted)`` of the next-token distributions on that text; (c) perplexity, under the
  adapted model, of the base model's own greedy answers to fixed English chat prompts (``prompts.py``).

``python -m benchmarks.continual_pretraining.run --help`` for the command line; ``run.py`` explains the protocol.
"""
