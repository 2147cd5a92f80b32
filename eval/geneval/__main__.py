"""`python -m eval.geneval`: the same command line as `python eval/geneval.py`."""
from eval.geneval.cli import main

main()
