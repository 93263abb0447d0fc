"""The GPU bring-up check's steps, run one process each by scripts/gpu_check.py.

Each module here is one step: `run(step)` fills a `Step` (lmservice's checks, measured figures and
markdown tables) on `step.device`. On a CUDA GPU the steps use the model's real shapes; with
`step.dry` they run the same code on the CPU at tiny shapes (Triton interpreter, torch references),
so that the plumbing is proven where no GPU is.
"""
