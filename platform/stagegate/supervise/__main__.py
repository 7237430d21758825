"""`python -m stagegate.supervise ROOT` runs the watchdog of ROOT (started by `watch`)."""

from stagegate.supervise.watchdog import main

main()
