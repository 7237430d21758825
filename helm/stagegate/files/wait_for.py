"""Wait until a URL answers 2xx (init containers run this with `python -c CODE URL`).

The router exits when its first policy load fails, and the worker needs a migrated
database: both wait for the API, whose own init container migrates, instead of
crash-looping into Kubernetes' growing restart back-off on a fresh install."""

import sys
import time
import urllib.request


def main(url: str) -> None:
    while True:
        try:
            urllib.request.urlopen(url, timeout=3).close()  # noqa: S310 - our own Service URL
        except OSError as exc:
            print(f"waiting for {url}: {exc}", flush=True)
            time.sleep(2)
        else:
            print(f"{url} answers", flush=True)
            return


if __name__ == "__main__":  # `python -c` runs it as __main__
    main(sys.argv[1])
