"""The ``curvlab`` command line (installed as the package ``curvlab_cli``)."""
