import sys

from engine.cli import entry

sys.exit(entry())
