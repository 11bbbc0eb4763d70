"""Experiment 1 of the evidence issue: synthetic biographies (bioS-style), forgetting vs learning per method.

``data`` generates the people, biographies, QA pairs and the word-level tokenizer; ``train`` encodes them, trains
and evaluates; ``run`` is the command line (``python -m benchmarks.biography.run [--quick]``).
"""
