"""``bhctl``: the command line of the controller."""
