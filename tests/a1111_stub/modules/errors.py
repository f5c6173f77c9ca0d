"""Stand-in for modules/errors.py: A1111 prints errors with their traceback to the console."""
import sys
import traceback


def print_error(message: str, exc_info: bool = False) -> None:
    print(message, file=sys.stderr)
    if exc_info:
        traceback.print_exc()


def report(message: str, *, exc_info: bool = False) -> None:
    print_error(message, exc_info=exc_info)
