"""nbval runs the goldens in kernels that inherit this environment: no progress bars (their
timings differ on every run). Run folders go to outputs/golden/ as when they were made."""
import os

os.environ["HANDCLIP_PROGRESS"] = "off"
