"""causality: sampling, and the proof that the causal mask stops information from the future.

Library code for `sample.py` (which alone imports Hydra and owns the console):

    sampling.py       the runtime (engine's Runtime for one process), the model (checkpoint, run
                      directory, export, Hugging Face directory or random-init preset), the prompt
                      (text -> checked token ids; the start token of an empty prompt; plot labels),
                      and generation that streams text to the terminal as tokens are made, timed
    leakage_tests.py  the three tests: perturbation, influence (||d h_t / d x_s||) and KV cache vs
                      recomputation (in float32); `variant` for the mask-off copy
    leakage.py        LeakageConfig, the tests run on the model and on its mask-off copy, and the
                      verdict PASS / LEAK / INCONCLUSIVE / FAIL
    report.py         the printed leakage report, its JSON summary, and the heatmap PNGs
    attention_maps.py attention weights per layer and head, which path computed them, and why the
                      zeros above the diagonal hold by construction
"""
