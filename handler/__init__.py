"""The entrypoints: the `superres` command, the Lambda handler, the SQS worker, the HTTP server."""

import os

# numpy's and OpenCV's OpenBLAS each start a thread per core at import, and those spin waiting for matrix work
# that the pipeline never gives them (it does no BLAS): ~0.13 s of CPU at every start, on the cores the stages
# need (docs/benchmarks.md). Set before either is imported; a value the user gives wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
