"""The bridge to lm-evaluation-harness: offsite's models as an lm-eval model type, its tasks as lm-eval tasks.

Needs the optional extra: `pip install "offsite[lm-eval]"`. Writing the task files (`tasks`) does not.
"""
