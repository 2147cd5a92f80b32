"""`python -m eval.fid sample|score ...` (see `eval.fid.cli`)."""
from eval.fid.cli import main

main()
