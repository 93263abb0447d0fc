"""Suite-wide set-up that must happen before any test module is imported.

NOTE: Triton picks interpreter or compiler when a kernel module is decorated, and
transformers / peft import triton as they load. Without a GPU the kernels can only
run in the interpreter, so TRITON_INTERPRET is set here, first.
"""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
