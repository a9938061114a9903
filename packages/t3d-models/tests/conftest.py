"""Root test configuration: no network, ever (the Hugging Face hub is unreachable here)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
