"""``python -m poelm`` (and ``torchrun -m poelm``) runs the CLI.

``poelm selftest faults`` runs its children as ``python -m poelm ARGS`` with
``$POELM_SELFTEST_FAULT`` set: the fault (a stall or a full disk at one named point of the
library) is installed here, before the CLI runs, so the harness in ``poelm.ops`` never imports
the CLI that sits above it.
"""

import json
import os
import sys

if os.environ.get("POELM_SELFTEST_FAULT"):
    from poelm.ops.selftest import FAULT_ENV, install_fault

    install_fault(json.loads(os.environ[FAULT_ENV]))

from poelm.cli import main  # noqa: E402  (after the fault hook, which patches library modules)

sys.exit(main())
