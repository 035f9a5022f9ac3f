"""``python -m deltahub.demo.localhub --port 0 --root DIR --token TOKEN:USER``: serve until interrupted."""

from .server import main

main()
