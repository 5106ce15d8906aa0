"""The process a fuzz campaign runs in: ``python -m dyadiq.fuzz.campaign_process``.

:func:`dyadiq.fuzz.harness.run_campaign` starts it fresh for every campaign, so the process
that forks a child per case has never run onnxruntime or Ray (whose threads can leave a forked
child hanging on a lock), whatever its caller has run. It reads the campaign's settings as
one JSON object on stdin and writes one JSON line per finished case to stdout,
``{"done": false, "campaign": ...}``, then ``{"done": true, "campaign": ...}``; anything else
the loop prints goes to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable

from dyadiq.forked import declare_fork_parent
from dyadiq.fuzz.harness import Campaign, CampaignSettings, campaign_here


def _resolve(runner: str) -> Callable[[list[str]], int]:
    module, _, function = runner.partition(":")
    found: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return found


def main() -> None:
    spec = json.loads(sys.stdin.read())
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not break the JSON lines

    def report(campaign: Campaign, done: bool) -> None:
        protocol.write(json.dumps({"done": done, "campaign": campaign.to_json()}) + "\n")

    declare_fork_parent()
    settings = CampaignSettings.from_json(spec)
    campaign = campaign_here(
        settings, _resolve(settings.runner), progress=lambda c: report(c, done=False)
    )
    report(campaign, done=True)
    protocol.close()


if __name__ == "__main__":
    main()
