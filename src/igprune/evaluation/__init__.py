"""Evaluation on the paper's six zero-shot tasks through lm-eval, with data from the offline cache."""
