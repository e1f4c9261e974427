"""``python -m tunnel`` and the ``pytunnel`` console script.

Start-up is mostly imports, whose objects nearly all live on: the cyclic garbage collector is
held off while they run (its ~80 passes over them cost ~10 ms of CPU and free almost nothing;
the price is ~0.4 MiB of RSS, the few cycles freed later leaving gaps), then switched on
before the configuration is read."""

import gc

gc.disable()

from tunnel.cli import main  # noqa: E402

gc.enable()

if __name__ == "__main__":
    main()
