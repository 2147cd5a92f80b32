"""ImageNet FID / IS / precision-recall in ADM's protocol: class-balanced resumable sampling, the TF-graph
Inception port, and ADM `.npz` batches. `python -m eval.fid` is the command line (`cli`)."""
