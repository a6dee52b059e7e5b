"""Command-line tools, run as `python -m tf_smallmm.bench` and `python -m tf_smallmm.demo`.

    bench  SmallMM against every built-in way to do the same work (benchmarks/RESULTS.md)
    demo   a CapsNet on scikit-learn's digits, on our layers and on TF's ops

May import any other part of tf_smallmm; nothing imports from here.
"""
