"""`lmservice batch`: OpenAI batch files answered by the server's own app in process (runner.py), the file
formats and resuming (files.py), and the progress line (progress.py)."""

# Lines in the engine at once: enough to fill a CPU's decode steps (the C decode step takes up to 32
# sequences) and a GPU's batches alike, while the waiting queue (1,024 sequences by default) never fills.
DEFAULT_CONCURRENCY = 64
