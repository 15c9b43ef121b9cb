"""``python -m kohonen_vae ...`` (also what ``torchrun -m kohonen_vae train ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
