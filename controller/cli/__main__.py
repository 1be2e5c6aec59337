"""``python -m controller.cli``: ``bhctl``, as ``bhctl run`` starts its gateway process."""

from controller.cli import main

main.main()
