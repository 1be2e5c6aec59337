"""The operators' web dashboard (``bhctl run --dashboard-addr``): server-rendered pages of
the plugins, their swaps, events, resource use and state, with swap actions behind the
gateway's bearer tokens. :mod:`.server` serves it, :mod:`.pages` renders it, :mod:`.charts`
draws its charts and :mod:`.history` keeps what they show."""
