import sys

from drivers import run_driver
from drivers.tensorfs import TensorFS

sys.exit(run_driver(TensorFS))
