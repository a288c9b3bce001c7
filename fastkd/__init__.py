"""fastkd: distil an nnU-Net v2 5-fold ensemble into one small, fast student.

The package is the library behind the Snakemake workflow in this repository: every rule is a thin
call into a ``fastkd`` subcommand (see :mod:`fastkd.cli`), and every artifact path is computed by
:mod:`fastkd.paths` from the validated config (:mod:`fastkd.config`).
"""

__version__ = "0.1.0"
