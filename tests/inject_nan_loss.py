"""``d2v run`` with a NaN added to one training loss of one process, so that its gradients stay
finite (what DeepSpeed would apply): ``D2V_NAN_LOSS=<process index>:<training forward number>``.
Used by tests of skipped updates under ``accelerate launch``."""

from __future__ import annotations

import os
import sys

from d2v.cli.main import main
from d2v.train import loop as train

PROCESS, FORWARD = (int(value) for value in os.environ["D2V_NAN_LOSS"].split(":"))
build = train.Run._build


def build_with_a_nan_loss(self, spec) -> None:
    build(self, spec)
    if self.accelerator.process_index != PROCESS:
        return
    forward, count = self.model.forward, {"training": 0}

    def forward_with_a_nan_loss(batch):
        out = forward(batch)
        count["training"] += self.model.training
        if self.model.training and count["training"] == FORWARD:
            out.loss = out.loss + float("nan")
        return out
    self.model.forward = forward_with_a_nan_loss


train.Run._build = build_with_a_nan_loss
sys.exit(main(sys.argv[1:]))
