"""``python -m falkon_convrfm``: the ``convrfm`` command line."""
from .cli import main

main()
