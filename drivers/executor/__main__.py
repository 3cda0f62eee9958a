import sys

from drivers import run_driver
from drivers.executor import Executor

sys.exit(run_driver(Executor))
