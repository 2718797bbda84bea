"""ADM evaluator in PyTorch: FID, sFID, Inception Score, precision and recall.

* `evaluations.metrics`   - the metric math (numpy/scipy/torch), any feature dimension
* `evaluations.inception` - the FID Inception-v3 network (2015-12-05 TF graph port)
* `evaluations.npz`       - streaming reader for ADM npz batch files
* `evaluations.evaluator` - the command line: python evaluations/evaluator.py REF.npz SAMPLE.npz
"""
