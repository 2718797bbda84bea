"""The embedded demo: CFG vs SoftCFG on sklearn's bundled handwritten digits.

`python -m demo` samples a small AliTok ARModel (shipped in demo/weights/) with no
guidance, CFG and SoftCFG, and evaluates the samples with a digits classifier.
See demo/run.py (the demo) and demo/digits.py (data, model, training, classifier).
"""
