import sys

from drivers import run_driver
from drivers.devices import Devices

sys.exit(run_driver(Devices))
