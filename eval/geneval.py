"""`python eval/geneval.py ...`: the GenEval command line (implemented in the `eval/geneval/` package)."""
from eval.geneval.cli import main

if __name__ == "__main__":
    main()
