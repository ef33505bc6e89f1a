"""(being written)"""

MODELS = {}
WEIGHTS = {}
