"""Named points where a fault test kills this process for real, with SIGKILL.

    VISIONLOOP_FAILPOINTS=trainer.export,promote.default_set visionloop retrain ...

A kill from outside lands at a random moment, mostly in the long training step; these
points put it exactly inside the short steps (export, each step of a promotion) whose
recovery is hardest. Unset (always, outside tests), a failpoint is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "VISIONLOOP_FAILPOINTS"


def failpoint(name: str) -> None:
    if name in os.environ.get(ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
