"""vitrain: config-driven training of Vision Transformers."""

import time as _time

__version__ = "0.3.0"
STARTED = _time.perf_counter()  # when the command's process imported vitrain: its summary line times the whole command
