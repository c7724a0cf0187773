"""Run taca's CLI under accelerate's FSDP2 code path in CPU processes (gloo), for the tests.

accelerate only selects FSDP on accelerator devices: with ``--device cpu`` its state stays
MULTI_CPU even when the launcher configured FSDP. This launcher turns that state into FSDP with
the plugin accelerate built from the launcher's environment (``--config_file
examples/accelerate_fsdp2.yaml``), then runs ``taca`` as ``python -m taca`` would. Nothing past
the state is replaced: ``fully_shard``, DTensor parameters, the sharded optimizer state and the
gradient reduce-scatter over gloo are accelerate's and torch's own code.

    accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes 2 \\
        --mixed_precision no tests/fsdp_cpu.py train ... --device cpu
"""
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":  # as accelerate does for FSDP on GPUs
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    from taca.cli import main

    sys.exit(main(sys.argv[1:]))
