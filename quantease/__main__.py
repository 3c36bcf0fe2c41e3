"""`python -m quantease ...` and `torchrun --nproc-per-node N -m quantease quantize ...`: the CLI."""
from .cli import main

main(prog_name="quantease")
