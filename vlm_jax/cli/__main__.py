"""`python -m vlm_jax.cli COMMAND ...`, as the `vlm-jax` script."""

import sys

from vlm_jax.cli import main

sys.exit(main())
