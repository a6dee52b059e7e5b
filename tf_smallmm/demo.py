"""`python -m tf_smallmm.demo`: the CapsNet demo (tf_smallmm.tools.demo)."""

from tf_smallmm.tools.demo import main

if __name__ == "__main__":
    main()
