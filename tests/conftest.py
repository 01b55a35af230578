import os

import torch

# pytest -n 2 runs two workers on a 2-core machine: one intra-op thread each avoids oversubscription,
# which makes small-tensor loops (GPTQ's column loop) many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
