"""``python -m tunnel`` and the ``pytunnel`` console script.

Start-up is mostly imports, whose objects nearly all live as long as the process: the cyclic
garbage collector is held off while they run, and what they built is then frozen out of its
sight (``gc.freeze``), so neither the ~80 collections during the imports nor the later ones
walk those objects again (measured: ~10 ms less CPU to `Accepting new connections`, for
~0.6 MiB of RSS: the few cycles the imports leave are kept).  Forked workers also keep
sharing those pages (a collection would touch every object's header).  A collection before
the freeze would give the 0.6 MiB back but costs more than the freeze saves."""

import gc

gc.disable()

from tunnel.cli import main  # noqa: E402

gc.freeze()
gc.enable()

if __name__ == "__main__":
    main()
