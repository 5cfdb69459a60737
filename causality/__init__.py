"""causality: sampling helpers and the proof that the causal mask stops information from the future.

Library code for `sample.py` (which alone imports Hydra and owns the console):

    runtime.py        device, precision (autocast) and compile set-up for inference
    loading.py        a model (and tokenizer) from a checkpoint, a run directory or a random-init preset
    prompt.py         prompt text -> token ids, with the checks a user needs (vocabulary, length, empty)
    stream.py         generation that streams text to the terminal as tokens are made, timed
    perturbation.py   leakage test 1: replace future tokens, measure the change at past positions
    influence.py      leakage test 2: ||d h_t / d x_s|| from autograd, an exact zero above the diagonal
    consistency.py    leakage test 3: greedy tokens with the KV cache equal full recomputation
    leakage.py        runs the three tests on the model and on a mask-off copy; the verdict
    report.py         the printed tables and the JSON summary of a leakage run
    plots.py          heatmap PNGs (influence maps, attention weights) with matplotlib's Agg canvas
    attention_maps.py attention weights of a prompt, per layer and head, written as PNGs
"""
