"""causality: sampling, and the proof that the causal mask stops information from the future.

sample.py's library (sample.py alone imports Hydra and owns the console): sampling.py (runtime,
model, prompt, streamed generation); leakage_tests.py (the three tests) and leakage.py (the check
and its verdict); report.py (the printed report, JSON and heatmaps, and the attention weights per
layer and head).
"""
