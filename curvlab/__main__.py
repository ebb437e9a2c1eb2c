"""``python -m curvlab`` (and ``torchrun … -m curvlab``): the ``curvlab`` command line."""

from curvlab_cli.main import main

main()
