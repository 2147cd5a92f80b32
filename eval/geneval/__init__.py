"""GenEval (Ghosh et al. 2023) with the official rules: prompts, generation in the official folder layout,
detection, colour classification, scoring, reports. `python eval/geneval.py` is the command line (`cli`)."""
