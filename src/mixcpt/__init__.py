"""mixcpt: Mix-CPT domain adaptation (design.md). The package's modules are imported by name."""

import importlib.util
import os

# DeepSpeed picks its accelerator when it is first imported (accelerate imports it whenever it is
# installed, for any run); with no GPU in sight it prints a warning on stdout, which would corrupt
# output meant for a pipe (e.g. a benchmark's JSON line). Naming the CPU accelerator it would pick
# anyway keeps it quiet. Only checked where DeepSpeed is installed and not told otherwise.
if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("deepspeed") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
