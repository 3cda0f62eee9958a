import sys

from drivers import run_driver
from drivers.echo import Echo

sys.exit(run_driver(Echo))
