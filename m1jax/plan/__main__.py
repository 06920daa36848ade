"""``python -m m1jax.plan``: see m1jax/plan/pod.py."""

import sys

from m1jax.plan.pod import main

sys.exit(main())
