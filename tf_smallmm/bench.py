"""`python -m tf_smallmm.bench`: the benchmark CLI (tf_smallmm.tools.bench)."""

from tf_smallmm.tools.bench import main

if __name__ == "__main__":
    main()
