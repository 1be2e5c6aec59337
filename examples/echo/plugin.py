"""The smallest plugin: answers every call with what it was sent."""

from typing import Any

from blackhole_sdk import Plugin, serve


class Echo(Plugin):
    provides = ("examples.echo",)

    def handle(self, method: str, payload: Any) -> Any:
        return {"method": method, "payload": payload}


if __name__ == "__main__":
    serve(Echo())
